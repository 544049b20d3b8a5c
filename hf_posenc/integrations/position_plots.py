"""Pictures of a converted model's position term (the survey's Figure 2) and passkey needle heatmaps.

    hf-posenc plot --positions MODEL_DIR --out DIR      # -> positions_<L>.png per length, positions_distance.png
    hf-posenc plot RESULTS... --out DIR                 # also needle.png when the results hold "<L>@<depth>" keys

Per head, the position term a query at i adds to its score for a key at j, over (i, j) at a few lengths, and a line
per head of the term against the distance i - j for the last query. What the term is follows the method's declared
:class:`~hf_posenc.methods.base.PositionTerm`:

- a bias (ALiBi, T5, FIRE): ``score_bias`` itself;
- a rotation (RoPE, xPos): the score q_rot(i) . k_rot(j) * scaling of one fixed random q = k per head (seed 0,
  unit RMS), i.e. the relative-score decay of the rotation;
- a content term (Shaw, Transformer-XL): layer 0's ``key_term`` for the same random q = k, times scaling;
- an embedding (sinusoidal, learned): one panel, the cosine similarity of the position embeddings of i and j;
- none (NoPE): nothing to draw (an error says so).
Causal models: keys after the query are masked, and left blank. Plain numbers on every axis (positions,
distances, score units). matplotlib's Agg canvas, no pyplot.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .._fs import sibling

LENGTHS = (32, 128, 512)
SEED = 0


def position_term(method, length: int, device=None) -> tuple[torch.Tensor, str]:
    """((heads', L, L) fp32 term for queries i (rows) and keys j (columns) at positions 0..L-1, what it is)."""
    positions = torch.arange(length, device=device)[None]  # (1, L)
    shape, term = method.shape, method.term
    with torch.no_grad():
        if term.bias:
            return method.score_bias(positions, positions)[0].float().cpu(), "score bias"
        if term.rotation or term.content:
            generator = torch.Generator().manual_seed(SEED)
            vector = torch.randn(1, shape.num_heads, 1, shape.head_dim, generator=generator).to(device)
            q = vector.expand(1, -1, length, -1).contiguous()
            scaling = shape.head_dim ** -0.5
            if term.content:
                return (method.key_term(q, q, 0, positions, positions)[0] * scaling).float().cpu(), \
                    "content term, layer 0 (random q = k)"
            q_rot, k_rot = method.rotate(q, q.clone(), positions, positions)
            return ((q_rot @ k_rot.transpose(-1, -2))[0] * scaling).float().cpu(), "rotated score (random q = k)"
        if term.embedding:
            table = method.embed(positions)[0].float()  # (L, E)
            table = table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return (table @ table.T)[None].cpu(), "cosine similarity of position embeddings"
    raise ValueError(f"method {method.name!r} adds no position term: nothing to plot")


def _figure(columns: int, rows: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.6 * columns + 1, 2.4 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    tmp = sibling(path, "partial")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)  # an old picture stays whole until the new one is
    return path


def plot_positions(model, out_dir: str | Path, lengths=LENGTHS, label: str = "") -> list[Path]:
    """Heatmaps per head at each length (``positions_<L>.png``) and the term against distance for the last query
    (``positions_distance.png``, at the longest length). Returns the paths written."""
    method = model.base_model.posenc
    device = next(model.parameters()).device
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    title = f"{label}: {method.name}" if label else method.name
    for length in lengths:
        term, what = position_term(method, length, device)
        if method.shape.causal:  # keys after the query are masked: not drawn
            term = term.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("nan"))
        heads = term.shape[0]
        columns = min(heads, 4)
        fig = _figure(columns, -(-heads // columns))
        axes = fig.subplots(-(-heads // columns), columns, squeeze=False)
        for h, ax in enumerate(axes.flat):
            if h >= heads:
                ax.axis("off")
                continue
            image = ax.imshow(term[h].numpy(), origin="upper", aspect="auto", interpolation="nearest",
                              extent=(-0.5, length - 0.5, length - 0.5, -0.5))
            ax.set_title(f"head {h}" if heads > 1 else what, fontsize=8)
            ax.set_xlabel("key position j", fontsize=7)
            ax.set_ylabel("query position i", fontsize=7)
            ax.tick_params(labelsize=6)
            fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
        fig.suptitle(f"{title}, {what}, length {length}", fontsize=9)
        written.append(_save(fig, out / f"positions_{length}.png"))
    length = max(lengths)
    term, what = position_term(method, length, device)
    fig = _figure(2, 1)
    ax = fig.add_subplot()
    distance = torch.arange(length)
    for h in range(term.shape[0]):
        ax.plot(distance.numpy(), term[h, -1].flip(0).numpy(), label=f"head {h}", linewidth=1)
    ax.set_xlabel("distance i - j (query at the last position)")
    ax.set_ylabel(what)
    ax.grid(True, alpha=0.3)
    if term.shape[0] <= 16:
        ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"{title}, length {length}", fontsize=9)
    written.append(_save(fig, out / "positions_distance.png"))
    return written


def plot_needles(grids: dict[str, dict[tuple[float, int], float]], out_dir: str | Path) -> list[Path]:
    """``needle.png``: per model, accuracy over (depth rows, length columns), the value written in each cell."""
    if not grids:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = _figure(min(len(grids), 3), -(-len(grids) // 3))
    axes = fig.subplots(-(-len(grids) // 3), min(len(grids), 3), squeeze=False)
    for ax, (label, grid) in zip(axes.flat, sorted(grids.items())):
        depths = sorted({d for d, _ in grid})
        lengths = sorted({n for _, n in grid})
        values = [[grid.get((d, n), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", interpolation="nearest")
        for r, row in enumerate(values):
            for c, value in enumerate(row):
                if value == value:  # not nan
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6, rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
        ax.set_xlabel("input tokens", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
        ax.set_title(label, fontsize=8)
        fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(grids):]:
        ax.axis("off")
    return [_save(fig, out / "needle.png")]
