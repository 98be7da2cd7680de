"""The load heatmap (matplotlib) of ``moerail balance --plot`` and
:meth:`moerail.balance.LoadTracker.plot_heatmap`."""

from __future__ import annotations

from typing import Any, Dict, Optional

from ._args import _loads
from .placement import default_placement, placement_metrics


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError("plot_heatmap needs matplotlib, which is not installed: pip install 'moerail[plot]'") from e
    return plt, TwoSlopeNorm, MaxNLocator


def plot_heatmap(
    path: str,
    load,
    phy2log=None,
    num_gpus: Optional[int] = None,
    num_nodes: int = 1,
    *,
    before=None,
    before_name: str = "before",
    after_name: str = "after",
) -> Dict[str, Any]:
    """Writes a PNG of titled heatmaps, one row per layer, each value a multiple of its layer's mean:

    * expert load ``load [L, E]`` (layers x experts), on its own colour scale (0 to its maximum:
      a few hot experts are many times the mean);
    * device load before (``before``, or Megatron's default layout ``E / num_gpus`` experts a device
      when ``num_gpus`` divides the experts) and after (``phy2log``), layers x devices, on one
      scale shared by the two (so they compare) centred on 1.0 (white = the mean; red = busier,
      blue = idler), with the node boundaries drawn and the busiest device of each layer marked.

    Returns what it drew: ``{"panels": [{"title", "vmin", "vmax", "node_boundaries"}, ...]}``.
    Needs matplotlib (``pip install 'moerail[plot]'``)."""
    plt, TwoSlopeNorm, MaxNLocator = _matplotlib()
    w = _loads(load, "load")
    num_layers, num_experts = w.shape
    if (phy2log is not None or before is not None) and num_gpus is None:
        raise ValueError("num_gpus: needed with a placement")
    if before is None and num_gpus is not None and num_experts % num_gpus == 0:
        before = default_placement(num_layers, num_experts, num_gpus)
    rel = (w / w.mean(1, keepdim=True).clamp_min(1e-300)).numpy()
    devices = []
    for name, p in ((before_name, before), (after_name, phy2log)):
        if p is None:
            continue
        m = placement_metrics(w, p, num_gpus, num_nodes)
        dl = m["device_load"]
        s = m["summary"]
        devices.append((
            f"{name}: device load / layer mean\nmax/mean {s['max_mean_device']:.3f} (lower bound {s['lower_bound']:.3f})",
            (dl / dl.mean(1, keepdim=True).clamp_min(1e-300)).numpy(),
        ))  # fmt: skip
    n = 1 + len(devices)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 0.22 * num_layers + 2.8), squeeze=False)
    drawn = []
    ax = axes[0][0]
    vmax_e = max(float(rel.max()), 1.0)
    im = ax.imshow(rel, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=vmax_e)
    ax.set_title(f"expert load / layer mean\n{num_layers} layers x {num_experts} experts", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="x layer mean")
    drawn.append({"title": ax.get_title(), "vmin": 0.0, "vmax": vmax_e, "node_boundaries": []})
    if devices:
        hi = max(float(d.max()) for _, d in devices)
        lo = min(float(d.min()) for _, d in devices)
        vmax = max(hi, 1.0 + 1e-3)
        vmin = min(lo, 1.0 - 1e-3)
        norm = TwoSlopeNorm(vmin=vmin, vcenter=1.0, vmax=vmax)
        per_node = num_gpus // num_nodes if num_nodes and num_gpus % num_nodes == 0 else None
        bounds = [k * per_node - 0.5 for k in range(1, num_nodes)] if per_node else []
        for ax, (title, data) in zip(axes[0][1:], devices):
            im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="coolwarm", norm=norm)
            for x in bounds:
                ax.axvline(x, color="black", linewidth=1.5)
            busiest = data.argmax(1)
            ax.scatter(busiest, range(num_layers), marker="|", color="black", s=30, linewidths=1)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(f"device ({num_nodes} node{'s' if num_nodes > 1 else ''}" +
                          (", black lines = node boundaries)" if bounds else ")") + "; | = busiest")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, label="x layer mean (1 = balanced)")
            drawn.append({"title": ax.get_title(), "vmin": vmin, "vmax": vmax, "node_boundaries": bounds})
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"panels": drawn}
