"""The reports' stylesheets and the token page's few lines of script, inlined into every page
(no external assets)."""

CSS = """
:root { --pro: #1a7f37; --opp: #c2410c; --ink: #1f2328; --muted: #656d76; --line: #d0d7de;
        --card-w: 172px; }
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
/* Cards of equal size in an even grid: fixed column width, rows of equal height, and every
   card built from the same rows (see bif.report.cards), the stats pinned to the bottom. */
.examples { display: grid; grid-template-columns: repeat(auto-fill, var(--card-w));
            grid-auto-rows: 1fr; gap: 8px; }
figure { margin: 0; }
.example { width: 128px; text-align: center; font-size: 12px; }
.train-example { display: flex; flex-direction: column; min-width: 0; text-align: center;
                 font-size: 12px; background: #fff; border: 1px solid var(--line);
                 border-radius: 6px; padding: 6px 6px 4px; }
.train-example > img { align-self: center; margin-bottom: 4px; }
.train-example figcaption { margin-top: auto; display: flex; flex-direction: column; }
.train-example figcaption > span { white-space: nowrap; overflow: hidden;
                                   text-overflow: ellipsis; line-height: 1.5; }
.train-example .index { color: var(--ink); font-weight: 600; }
.example img, .train-example img { width: 80px; height: auto; image-rendering: pixelated;
     border: 1px solid var(--line); border-radius: 4px; background: #fff; }
.query-example img { width: 128px; }
.train-example .score { font-variant-numeric: tabular-nums; color: var(--ink); font-size: 12px;
                        font-weight: 600; }
.train-example .loss-star, .train-example .z { font-size: 11px; font-variant-numeric:
                                                tabular-nums; }
.train-example.proponent .score { color: var(--pro); }
.train-example.opponent .score { color: var(--opp); }
.train-example.not-significant { opacity: 0.55; }
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
.plot[data-plot="chains"], .plot[data-plot="query-traces"] { flex-basis: 100%;
                                                               max-width: 840px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f3f6; }
td.value { font-family: ui-monospace, monospace; white-space: nowrap; }
tr.group th { background: #f6f8fa; font-weight: 600; }
tr.group th .muted { font-weight: normal; }
td.key.depth-1, th.depth-1 { padding-left: 24px; }
td.key.depth-2, th.depth-2 { padding-left: 40px; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
/* Chain diagnostics: the verdict banner, badges and the R-hat/ESS tables. */
.verdict { border: 1px solid; border-left-width: 6px; border-radius: 8px; padding: 6px 16px;
           margin: 10px 0 14px; background: #fff; }
.verdict p { margin: 4px 0; }
.verdict-ok { border-color: #1a7f37; background: #dafbe1; }
.verdict-warn { border-color: #bf8700; background: #fff8c5; }
.verdict-fail { border-color: #cf222e; background: #ffebe9; }
.verdict-none { border-color: var(--line); color: var(--muted); }
.verdict .reasons { margin: 4px 0 6px; padding-left: 20px; }
.verdict .reason { margin: 4px 0; }
.verdict .reason .level { display: inline-block; padding: 0 6px; border-radius: 10px;
                          font-size: 11px; font-weight: 600; text-transform: uppercase;
                          color: #fff; background: #9a6700; }
.verdict .reason-fail .level { background: #cf222e; }
.verdict .fix { color: var(--ink); font-size: 13px; margin-top: 2px; }
.badge { display: inline-block; padding: 0 6px; border-radius: 10px; font-size: 11px;
         font-weight: 600; vertical-align: middle; cursor: help; }
.badge.unresolved { background: #fff8c5; color: #7d4e00; border: 1px solid #d4a72c; }
.resolved { color: var(--muted); font-size: 12px; }
.diagnostics-table { margin: 6px 0 10px; }
.diagnostics-table td.value { text-align: right; font-variant-numeric: tabular-nums; }
.diagnostics-table td.flag-warn { background: #fff8c5; }
.diagnostics-table td.flag-fail { background: #ffebe9; color: #a40e26; font-weight: 600; }
.diagnostics-table[data-table="queries"] { max-height: 32em; display: block; overflow: auto; }
.chain-diagnostics .plots { margin-bottom: 8px; }
"""

TOKEN_CSS = """
.token-report { --pro: rgb(33,102,172); --opp: rgb(178,24,43); }
.tokens { white-space: pre-wrap; word-break: break-word; font: 13px/1.7 ui-monospace, monospace;
          background: #fff; border: 1px solid var(--line); border-radius: 4px; padding: 6px;
          margin: 4px 0; max-height: 16em; overflow: auto; }
.tok { border-radius: 2px; }
.tok:hover { outline: 1px solid var(--ink); }
.tok.na { color: var(--muted); }
.token-query { background: #fff; border: 1px solid var(--line); border-radius: 8px;
               padding: 8px 14px; margin: 12px 0; }
.token-query h3 { margin-top: 4px; }
.passage { cursor: pointer; border: 2px solid transparent; border-radius: 6px; padding: 2px 6px;
           margin: 4px 0; }
.passage:hover { border-color: var(--line); }
.passage.selected { border-color: var(--ink); }
.passage.not-significant .passage-head { opacity: 0.6; }
.passage-head { font-size: 12px; font-variant-numeric: tabular-nums; }
.legend { display: flex; align-items: center; gap: 8px; font-size: 12px; color: var(--muted);
          flex-wrap: wrap; margin: 4px 0; }
.legend .bar { width: 160px; height: 12px; border: 1px solid var(--line); border-radius: 2px; }
/* Without saved token text, tokens are their positions: boxed, so "12" "13" never run together. */
.positional .tokens .tok { display: inline-block; min-width: 3ch; margin: 1px; padding: 0 2px;
                           text-align: center; border: 1px solid var(--line); font-size: 11px; }
.notice { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 8px; padding: 4px 16px;
          margin: 12px 0; }
.notice pre { background: #fff; border: 1px solid var(--line); border-radius: 4px; padding: 6px;
              overflow: auto; }
.query-value { font-size: 12px; color: var(--muted); font-weight: normal; }
"""

TOKEN_SCRIPT = """
// Switch which passage colours a query (click a passage, or pick it in the drop-down).
function bifSelect(passage) {
  const q = passage.closest('.token-query');
  const data = JSON.parse(passage.dataset.colouring);
  q.querySelectorAll('.query-tokens .tok').forEach((t, i) => {
    const [s, colour, title] = data[i];
    t.style.background = colour || '';
    t.classList.toggle('na', s === null);
    t.dataset.score = s === null ? 'nan' : String(s);
    t.title = title;
  });
  q.querySelectorAll('.passage').forEach(p => p.classList.toggle('selected', p === passage));
  const sel = q.querySelector('select.colour-by');
  if (sel) sel.value = passage.dataset.key;
}
document.addEventListener('click', ev => {
  const p = ev.target.closest && ev.target.closest('.passage');
  if (p) bifSelect(p);
});
document.addEventListener('change', ev => {
  if (!ev.target.matches('select.colour-by')) return;
  const q = ev.target.closest('.token-query');
  bifSelect(q.querySelector('.passage[data-key="' + ev.target.value + '"]'));
});
"""
