"""Kronecker-factored (K-FAC) mass matrix for the kinetic sampler: one curvature block per layer,
memory linear in the layer widths, so that it scales to billions of sampled parameters.

A supported layer l (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``) maps inputs a to outputs
``s = X_l ã`` with its weight viewed as a matrix ``X_l [d_out, d_in]`` (a Linear's bias is a last
column of X_l acting on a constant input 1, ``ã = [a; 1]``; a Conv2d's input is its unfolded
patch; an Embedding's is a one-hot token). Its block of the mass is

    M_l = nβ · (G_l ⊗ A_l) + γ · I,      i.e.   X ↦ nβ · G_l X A_l + γ · X
    A_l = (1/T) Σ_{i,t} ã_{i,t} ã_{i,t}ᵀ    [d_in, d_in]     T: positions carrying a loss
    G_l = (1/n) Σ_{i,t} g_{i,t} g_{i,t}ᵀ    [d_out, d_out]   g_{i,t} = ∂l_i(ŷ_i)/∂s_{i,t}

over the n examples i and their positions t (tokens, conv patches; one for a plain MLP), with
l_i the per-example loss at a target ŷ_i DRAWN FROM THE MODEL'S OWN PREDICTIVE (the Monte Carlo
Fisher; :mod:`bif.sampler.kronecker_build` says why). E_ŷ[∇l_i ∇l_iᵀ] is the Gauss-Newton matrix
of l_i, and G_l ⊗ A_l is the "K-FAC expand" approximation of ``(1/n) Σ_i E[∇l_i ∇l_iᵀ] ≈ H``, the
Hessian of the MEAN loss L_n, so M_l approximates the block of the posterior precision
``nβ·H + γ·I`` (:mod:`bif.posterior`) in its own units. Every sampled parameter outside a block
(norms, tied or unsupported layers) has mass γ; parameters not sampled are not in the flat vector.

Negative curvature: G_l and A_l are second moments, hence PSD, so every block is SPD by
construction and nothing has to be detected, counted or localised to keep the mass valid. (The
mass changes only the dynamics: a Hessian eigenvalue below -γ/nβ still makes the target itself
improper, as with any mass.)

Operators, from eigendecompositions ``A = Q_A diag(λ_A) Q_Aᵀ``, ``G = Q_G diag(λ_G) Q_Gᵀ``:

    M_l^p X = Q_G [ (Q_Gᵀ X Q_A) ⊙ f_p(λ_G λ_Aᵀ) ] Q_Aᵀ,     f_p(e) = (nβ·e + γ)^p

With the eigenvalue correction (EK-FAC) λ_G λ_Aᵀ is replaced by ``S = (1/n) Σ_i (Q_Gᵀ ∇_X l_i
Q_A)²``, the exact diagonal of the Fisher in the Kronecker eigenbasis.

Truncation (the memory cap): a factor of dimension d keeps its top ``k = min(d, r)`` eigenpairs
and the mean τ of its other eigenvalues, ``F ≈ Q diag(λ) Qᵀ + τ (I - QQᵀ)``. The kept spaces and
their complements split the block into four orthogonal subspaces with eigenvalues λ_G λ_A,
λ_G τ_A, τ_G λ_A and τ_G τ_A; M_l^p is computed exactly on each, so M is still an exact SPD
operator and the stationary law of the sampler is unchanged (only the preconditioning is cruder).

Memory (:func:`mass_floats`; b bytes per element of the mass's dtype):

    bytes = b · Σ_l [ m(d_in,l) + m(d_out,l) + c_l ]
    m(d) = d·k + k, k = min(d, r)       a dense factor (Linear, Conv2d, an Embedding's G)
    m(d) = d                            an Embedding's input factor (diagonal: token frequencies)
    c_l  = k_G · k_A                    the eigenvalue correction's S (0 without it)

At r = 128 a 1 B-parameter Llama's mass is 7-9% of its float32 replica
(:mod:`bif.bench.kronecker_memory`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

import torch
from torch import Tensor, nn


class LayerSpec(NamedTuple):
    """A factored layer: where its weight and bias sit, and the dims of its factors.

    Attributes:
        name: the module's name in the model.
        kind: "linear", "conv2d" or "embedding".
        weight: the sampled weight's key (None: only the bias is sampled).
        bias: the sampled bias's key (folded into A as an input column of ones), or None.
        d_out: rows of X (out features / out channels / embedding dim).
        d_in: columns of X, the bias column included (in features / in·kh·kw patch / vocab).
    """

    name: str
    kind: str
    weight: str | None
    bias: str | None
    d_out: int
    d_in: int


class Factor(NamedTuple):
    """A PSD factor ``Q diag(values) Qᵀ + tail·(I - QQᵀ)`` of dimension ``dim``.

    Attributes:
        values: ``[k]`` kept eigenvalues (>= 0, descending); a diagonal factor: its ``[dim]``
            diagonal.
        vectors: ``[dim, k]`` orthonormal eigenvectors; None for a diagonal factor.
        tail: eigenvalue on the complement of ``vectors`` (used when k < dim).
        dim: d.
    """

    values: Tensor
    vectors: Tensor | None
    tail: float
    dim: int

    @property
    def truncated(self) -> bool:
        return self.vectors is not None and self.vectors.shape[1] < self.dim

    def dense(self) -> Tensor:
        """``[dim, dim]`` (for tests and small factors)."""
        if self.vectors is None:
            return torch.diag(self.values)
        q = self.vectors
        eye = torch.eye(self.dim, dtype=q.dtype, device=q.device)
        return q @ torch.diag(self.values) @ q.T + self.tail * (eye - q @ q.T)

    def to(self, device: torch.device | str | None, dtype: torch.dtype | None) -> Factor:
        vec = None if self.vectors is None else self.vectors.to(device, dtype)
        return self._replace(values=self.values.to(device, dtype), vectors=vec)


class KroneckerBlock(NamedTuple):
    """One layer's block: its spans in the flat vector, its factors and optional EK-FAC core.

    Attributes:
        spec: the layer.
        weight_span: ``(start, stop)`` of the weight in the flat ``[P]`` vector, or None.
        bias_span: the same for the bias, or None.
        a: input factor ``[d_in, d_in]``; g: output-gradient factor ``[d_out, d_out]``.
        core: ``[k_G, k_A]`` eigenvalue-corrected products replacing ``λ_G λ_Aᵀ``, or None.
    """

    spec: LayerSpec
    weight_span: tuple[int, int] | None
    bias_span: tuple[int, int] | None
    a: Factor
    g: Factor
    core: Tensor | None = None

    def gather(self, x: Tensor) -> Tensor:
        """``x [G, P]`` -> this layer's ``X [G, d_out, d_in]``."""
        s, n = self.spec, x.shape[0]
        parts = []
        if self.weight_span is not None:
            w = x[:, self.weight_span[0] : self.weight_span[1]]
            if s.kind == "embedding":  # weight [vocab, dim] is Xᵀ
                parts.append(w.reshape(n, s.d_in, s.d_out).mT)
            else:
                parts.append(w.reshape(n, s.d_out, -1))
        if self.bias_span is not None:
            parts.append(x[:, self.bias_span[0] : self.bias_span[1], None])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def scatter(self, y: Tensor, out: Tensor) -> None:
        """Write ``y [G, d_out, d_in]`` into this layer's spans of ``out [G, P]``."""
        n = y.shape[0]
        if self.weight_span is not None:
            w = y.mT if self.spec.kind == "embedding" else y
            if self.bias_span is not None:
                w = w[..., :-1]
            out[:, self.weight_span[0] : self.weight_span[1]] = w.reshape(n, -1)
        if self.bias_span is not None:
            out[:, self.bias_span[0] : self.bias_span[1]] = y[..., -1]

    def power(self, x: Tensor, p: float, nbeta: float, gamma: float) -> Tensor:
        """``M_l^p X`` for ``X [G, d_out, d_in]`` (the four-subspace formula of the module)."""

        def f(e: Tensor) -> Tensor:
            return (nbeta * e + gamma).pow(p)

        lam_a, lam_g = self.a.values.clamp_min(0), self.g.values.clamp_min(0)
        qa, qg = self.a.vectors, self.g.vectors
        assert qg is not None
        f_kk = f(self.core.clamp_min(0) if self.core is not None else lam_g[:, None] * lam_a)

        def right(y: Tensor) -> Tensor:  # y ↦ y Q_Aᵀ
            return y if qa is None else y @ qa.mT

        rx = x if qa is None else x @ qa  # [G, d_out, k_A]
        lrx = qg.mT @ rx  # [G, k_G, k_A]
        ta, tg = self.a.truncated, self.g.truncated
        if not (ta or tg):
            return right(qg @ (f_kk * lrx))
        f_pk = f(self.g.tail * lam_a)[None, :] if tg else None  # G's complement ⊗ A kept
        if not ta:
            assert f_pk is not None
            return right(qg @ ((f_kk - f_pk) * lrx) + f_pk * rx)
        f_kp = f(lam_g * self.a.tail)[:, None]  # G kept ⊗ A's complement
        lx = qg.mT @ x  # [G, k_G, d_in]
        if f_pk is None:
            return qg @ (right((f_kk - f_kp) * lrx) + f_kp * lx)
        f_pp = (nbeta * self.g.tail * self.a.tail + gamma) ** p
        core = right((f_kk - f_kp - f_pk + f_pp) * lrx) + (f_kp - f_pp) * lx
        return qg @ core + right((f_pk - f_pp) * rx) + f_pp * x

    def tensors(self) -> list[Tensor]:
        out = [self.a.values, self.g.values]
        out += [t for t in (self.a.vectors, self.g.vectors, self.core) if t is not None]
        return out

    def to(self, device: torch.device | str | None, dtype: torch.dtype | None) -> KroneckerBlock:
        core = None if self.core is None else self.core.to(device, dtype)
        return self._replace(a=self.a.to(device, dtype), g=self.g.to(device, dtype), core=core)


class KroneckerMass(NamedTuple):
    """``M = blockdiag(nβ·(G_l ⊗ A_l) + γ·I, ..., γ·I)`` on flat vectors ``x [..., P]``.

    P is the number of sampled parameters, in the key order of the sampled parameter dict
    (:func:`bif.sampler.mass.flatten`); parameters outside every block have mass γ. The factors do
    not depend on nβ or γ: ``mass._replace(nbeta=..., gamma=...)`` re-scales for free.

    Memory: ``b · Σ_l [m(d_in) + m(d_out) + c_l]`` bytes (module docstring; :func:`mass_floats`),
    measured by :meth:`memory_bytes`.

    Chain groups (``rows``): the per-layer products fold the chain dimension into the rows of one
    matrix product, whose rounding depends on the number of rows; a ``[G, P]`` group is therefore
    zero-padded to ``rows`` rows (as :func:`bif.sampler.mass.group_matmul` does), which makes each
    chain's result bit for bit the single-process one at the single-process cost.

    Attributes:
        nbeta: nβ; gamma: γ.
        blocks: the factored layers.
        num_params: P.
        rank: r, the most eigenpairs kept per factor.
        rows: see above; 0: as it is.
    """

    nbeta: float
    gamma: float
    blocks: tuple[KroneckerBlock, ...]
    num_params: int
    rank: int
    rows: int = 0

    def _apply(self, x: Tensor, power: float) -> Tensor:
        """``M^power · x`` for ``x [..., P]``."""
        shape, p = x.shape, self.num_params
        flat = x.reshape(-1, p)
        g = flat.shape[0]
        if x.dim() == 2 and self.rows > g:
            flat = torch.cat([flat, flat.new_zeros(self.rows - g, p)])
        out = flat * self.gamma**power
        for b in self.blocks:
            b.scatter(b.power(b.gather(flat), power, self.nbeta, self.gamma), out)
        return out[:g].reshape(shape)

    def matvec(self, x: Tensor) -> Tensor:
        """``M x``."""
        return self._apply(x, 1.0)

    def inverse(self, x: Tensor) -> Tensor:
        return self._apply(x, -1.0)

    def sqrt(self, x: Tensor) -> Tensor:
        return self._apply(x, 0.5)

    def inverse_sqrt(self, x: Tensor) -> Tensor:
        return self._apply(x, -0.5)

    def memory_bytes(self) -> int:
        """Bytes of every tensor the mass holds."""
        return sum(t.nbytes for b in self.blocks for t in b.tensors())

    def to(
        self, device: torch.device | str | None, dtype: torch.dtype | None = None
    ) -> KroneckerMass:
        return self._replace(blocks=tuple(b.to(device, dtype) for b in self.blocks))


def factor_floats(d: int, rank: int, diagonal: bool = False) -> int:
    """Elements held by one factor of dimension d (``m(d)`` of the module docstring)."""
    if diagonal:
        return d
    k = min(d, rank)
    return d * k + k


def mass_floats(specs: list[LayerSpec], rank: int, correction: bool) -> int:
    """Elements held by a :class:`KroneckerMass` of these layers at rank r (the formula)."""
    total = 0
    for s in specs:
        diag = s.kind == "embedding"
        total += factor_floats(s.d_in, rank, diag) + factor_floats(s.d_out, rank)
        if correction and not diag:
            total += min(s.d_in, rank) * min(s.d_out, rank)
    return total


def budget_rank(specs: list[LayerSpec], rank: int, correction: bool, size: int, cap: float) -> int:
    """The largest r <= ``rank`` whose mass takes at most ``cap`` bytes (``size`` bytes per
    element; 1 if none does)."""
    lo, hi = 1, max(1, rank)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if mass_floats(specs, mid, correction) * size <= cap else (lo, mid - 1)
    return lo


_TYPES: dict[type, str] = {nn.Linear: "linear", nn.Conv2d: "conv2d", nn.Embedding: "embedding"}


def plan_layers(module: nn.Module, sampled: list[str]) -> tuple[list[LayerSpec], dict[str, str]]:
    """The factorable layers among ``sampled`` parameter keys, and why the others get γ·I.

    Supported: ``nn.Linear``, ``nn.Conv2d`` (groups 1, zero padding, numeric padding) and
    ``nn.Embedding`` (no max_norm) whose own ``forward`` is used, with parameters not shared
    with another module (tied embeddings fall back). Works on a meta-device model.
    """
    want = set(sampled)
    key_of = {id(p): k for k, p in module.named_parameters()}
    uses = Counter(id(p) for m in module.modules() for p in m._parameters.values() if p is not None)
    specs, covered = [], set()
    reasons: dict[str, str] = {}
    for name, mod in module.named_modules():
        own = {n: p for n, p in mod.named_parameters(recurse=False)}
        keys = {n: key_of[id(p)] for n, p in own.items() if key_of.get(id(p)) in want}
        if not keys:
            continue
        kind = next((v for t, v in _TYPES.items() if type(mod).forward is t.forward), None)
        why = _unsupported(mod, kind)
        if why is not None or set(keys) - {"weight", "bias"}:
            for k in keys.values():
                reasons.setdefault(k, why or "unsupported parameter")
            continue
        for n in [n for n in keys if uses[id(own[n])] > 1]:  # the rest of the layer is factored
            reasons.setdefault(keys.pop(n), "parameter shared with another module (tied)")
        w, b = keys.get("weight"), keys.get("bias")
        if w is None and (kind == "embedding" or b is None):
            continue
        if kind == "embedding":
            d_out, d_in = mod.embedding_dim, mod.num_embeddings
        else:
            d_out, d_in = mod.weight.shape[0], math.prod(mod.weight.shape[1:])
            d_in = (d_in if w is not None else 0) + (b is not None)
        specs.append(LayerSpec(name, kind, w, b, int(d_out), int(d_in)))  # type: ignore[arg-type]
        covered.update(keys.values())
    for k in sampled:
        if k not in covered:
            reasons.setdefault(k, "no supported module")
    return specs, {k: reasons[k] for k in sampled if k in reasons}


def _unsupported(mod: nn.Module, kind: str | None) -> str | None:
    if kind is None:
        return f"unsupported module {type(mod).__name__}"
    if kind == "conv2d" and (mod.groups != 1 or mod.padding_mode != "zeros"
                             or mod.padding == "same"):  # fmt: skip
        return "Conv2d with groups, 'same' or non-zero padding mode"
    if kind == "embedding" and mod.max_norm is not None:
        return "Embedding with max_norm"
    return None
