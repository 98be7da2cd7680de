"""``update_expert_placement``: re-places and migrates the experts of the ``use_moerail`` layers."""

from __future__ import annotations

from typing import Optional

import torch

from .dispatcher import _dispatcher_class

__all__ = ["update_expert_placement"]


def _dispatched_layers(model) -> list:
    cls = _dispatcher_class()
    layers = [m for m in model.modules() if isinstance(getattr(m, "token_dispatcher", None), cls)]
    if not layers:
        raise ValueError("model: no MoE layer with moerail's dispatcher in it (apply use_moerail first)")
    return layers


def update_expert_placement(model, load, optimizer=None, *, num_nodes: int = 1, mode: str = "refine",
                            seconds_per_token: Optional[float] = None, horizon_steps: Optional[float] = None):
    """Re-places the experts of every ``use_moerail`` layer of ``model`` for ``load [L, E]``
    (e.g. ``LoadTracker.predict()`` over these layers, in module order) and moves them: call it on
    every rank of the EP group at a global-batch boundary, after the optimizer step.

    Megatron's experts module holds ``E / ep`` experts a rank, so the new placement packs experts
    onto ranks (``rebalance_experts(load, E, 1, num_nodes, ep, mode)``, no replicas; with
    ``mode="incremental"``, ``improve_placement(load, current, ep, num_nodes, keep_nodes=False)``:
    the current placement improved by swaps, within and across nodes, so fewer experts move and
    re-placing often stays cheap); the move is
    planned to keep experts where they are (``plan_migration``), and with ``seconds_per_token`` and
    ``horizon_steps`` it is made only when ``should_migrate`` says it pays. ``migrate_experts``
    moves each expert's weights and, with ``optimizer`` (a torch optimizer holding them, e.g.
    Adam), their state; then every layer's dispatcher routes by the new placement. Local-spec
    ``SequentialMLP`` experts only (grouped-GEMM experts keep their weights in one tensor).
    Returns ``{"migrated", "plan", "decision", "before", "after"}`` (device max/mean on ``load``)."""
    import moerail  # noqa: PLC0415

    layers = _dispatched_layers(model)
    slot_params = []
    for m in layers:
        local = getattr(m.experts, "local_experts", None)
        if local is None:
            raise NotImplementedError(
                f"update_expert_placement: {type(m.experts).__name__} experts keep their weights in shared "
                "tensors; use the local spec (SequentialMLP)")
        slot_params.append([list(e.parameters()) for e in local])
    d0 = layers[0].token_dispatcher.exchange
    w, e = d0.world, d0.num_experts
    load = torch.as_tensor(load, dtype=torch.float64)
    if tuple(load.shape) != (len(layers), e):
        raise ValueError(f"load: expected shape ({len(layers)}, {e}) (moerail MoE layers x experts), got "
                         f"{tuple(load.shape)}")
    current = torch.stack([m.token_dispatcher.exchange.phy2log for m in layers])
    if mode == "incremental":
        # Across nodes too: without replicas every expert is trivially "in one node", and keeping it
        # there would leave the busiest node's excess where it is.
        new, _, _ = moerail.improve_placement(load, current, w, num_nodes, keep_nodes=False)
    else:
        new, _, _ = moerail.rebalance_experts(load, e, 1, num_nodes, w, mode=mode)
    tensors = moerail.expert_slot_tensors(slot_params, optimizer)
    expert_bytes = sum(t.numel() * t.element_size() for t in tensors[0][0])
    plan = moerail.plan_migration(current, new, w, num_nodes, expert_bytes=expert_bytes)
    before = moerail.placement_metrics(load, current, w, num_nodes)["summary"]["max_mean_device"]
    after = moerail.placement_metrics(load, plan.phy2log, w, num_nodes)["summary"]["max_mean_device"]
    decision = None
    migrate = True
    if seconds_per_token is not None and horizon_steps is not None:
        decision = moerail.should_migrate(load, current, plan, w, num_nodes, seconds_per_token=seconds_per_token,
                                          horizon_steps=horizon_steps)
        migrate = decision.migrate
    if migrate:
        moerail.migrate_experts(plan, tensors, group=d0.ep_group)
        for i, m in enumerate(layers):
            m.token_dispatcher.exchange.set_placement(plan.phy2log[i])
    return {"migrated": migrate, "plan": plan, "decision": decision, "before": before, "after": after}
