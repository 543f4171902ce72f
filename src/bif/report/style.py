"""The report's stylesheet, inlined into every page (no external assets)."""

CSS = """
:root { --pro: #1a7f37; --opp: #c2410c; --ink: #1f2328; --muted: #656d76; --line: #d0d7de; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--ink); background: #f6f8fa; }
main { max-width: 1280px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 4px; }
h2 { font-size: 18px; margin: 28px 0 10px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
h4 { font-size: 13px; margin: 0 0 6px; }
.summary, .muted, figcaption { color: var(--muted); }
.explainer { background: #fff; border: 1px solid var(--line); border-radius: 8px;
             padding: 4px 16px; }
.explainer h2 { margin-top: 8px; }
.explainer .pro { color: var(--pro); font-weight: 600; }
.explainer .opp { color: var(--opp); font-weight: 600; }
.query { display: flex; gap: 16px; background: #fff; border: 1px solid var(--line);
         border-radius: 8px; padding: 12px; margin: 12px 0; align-items: flex-start; }
.query-card { flex: 0 0 170px; }
.query-card h3 { margin-top: 0; }
.query-card dl { margin: 6px 0 0; display: grid; grid-template-columns: auto 1fr;
                 gap: 0 8px; font-size: 12px; }
.query-card dt { color: var(--muted); }
.query-card dd { margin: 0; }
.influences { flex: 1; display: flex; flex-direction: column; gap: 10px; min-width: 0; }
.group { border-left: 4px solid var(--line); padding-left: 10px; }
.group.proponents { border-color: var(--pro); }
.group.opponents { border-color: var(--opp); }
.group.proponents h4 { color: var(--pro); }
.group.opponents h4 { color: var(--opp); }
.examples { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; }
.example, .train-example { width: 128px; text-align: center; font-size: 12px; }
.example img, .train-example img { width: 80px; height: auto; image-rendering: pixelated;
     border: 1px solid var(--line); border-radius: 4px; background: #fff; }
.query-example img { width: 128px; }
.train-example .score { font-variant-numeric: tabular-nums; color: var(--ink);
                        white-space: nowrap; font-size: 11px; }
.train-example.proponent .score { color: var(--pro); }
.train-example.opponent .score { color: var(--opp); }
.train-example.not-significant { opacity: 0.5; }
.example-text { text-align: left; white-space: pre-wrap; font-size: 11px; margin: 0;
                max-height: 8em; overflow: auto; background: #fff; border: 1px solid var(--line);
                padding: 4px; }
.tag { display: inline-block; padding: 0 6px; border-radius: 10px; font-size: 11px;
       background: #eaeef2; margin: 2px 2px 0 0; }
.tag-misclassified { background: #ffebe9; color: #a40e26; }
.tag-correct { background: #dafbe1; color: #116329; }
.none { color: var(--muted); font-style: italic; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plot { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px;
        flex: 1 1 520px; max-width: 640px; }
.plot img { max-width: 100%; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; }
td.value { font-family: ui-monospace, monospace; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
"""
