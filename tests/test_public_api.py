"""The public API after the package became folders (ops/, backends/, ep/, balance/, sim/,
integrations/megatron/): every name of ``moerail.__all__`` resolves, the packages that kept their
name export what their modules did, the old module paths still import (with a
``DeprecationWarning`` naming the new place) and hand out the same objects, and the layers import
only downwards."""

from __future__ import annotations

import ast
import importlib
import pathlib
import sys

import pytest

import moerail

PACKAGE = pathlib.Path(moerail.__file__).resolve().parent

# Old module path -> (the path its warning names, the module holding the objects now, every public
# name the old module had).
MOVED = {
    "moerail.a2a": ("moerail.ep", "moerail.ep", ["AllToAllDispatcher", "AllToAllPlan", "STRATEGIES", "plan_all_to_all"]),
    "moerail.dispatch": (
        "moerail.ops",
        "moerail.ops.permutation",
        ["PermuteResult", "permute", "permute_by_indices", "sort_chunks_by_idxs", "unpermute"],
    ),
    "moerail.router": (
        "moerail.ops",
        "moerail.ops.router",
        [
            "SCORE_FUNCTIONS",
            "apply_token_dropping",
            "expert_bias_update",
            "get_capacity",
            "routing_scores_for_aux_loss",
            "sequence_load_balancing_loss",
            "switch_load_balancing_loss",
            "topk_route",
            "z_loss",
        ],
    ),
    "moerail.ascend": ("moerail.backends.hccl", "moerail.backends.hccl", ["HcclExchange"]),
}

# Private helpers of the old modules that tests and benches used: still reachable through them.
MOVED_PRIVATE = {
    "moerail.a2a": {"_compact": "moerail.ep.plan", "_make_plan": "moerail.ep.plan",
                    "_Dispatch": "moerail.ep.autograd"},
    "moerail.dispatch": {"_row_counts": "moerail.ops.permutation"},
    "moerail.router": {"_logits": "moerail.ops.router"},
}

# Modules that became packages of the same name: every public name the module had.
KEPT = {
    "moerail.balance": [
        "LinkModel", "LoadTracker", "MODES", "MigrationDecision", "MigrationPlan", "PREDICTORS", "SlotTensors",
        "allreduce_replica_grads", "default_placement", "expand_placement", "expert_seconds_per_token",
        "expert_slot_tensors", "improve_placement", "load_loads", "log2phy_from_phy2log", "logger", "lower_bound",
        "migrate_experts", "placement_metrics", "plan_migration", "plot_heatmap", "rebalance_experts",
        "select_replicas", "select_replicas_map", "should_migrate",
    ],
    "moerail.sim": [
        "ConfigLike", "H100_CALIBRATION", "PRESETS", "PRIORS", "PUBLISHED", "SECTIONS", "calibrate",
        "cluster_presets", "config_keys", "load_config", "model_presets", "parse_megatron_args", "rank_groups",
        "resolve_config", "search", "simulate",
    ],
    "moerail.backends": ["BackendNotFoundWarning", "format_report", "notice_cpu_only", "op_backends", "report"],
    "moerail.integrations.megatron": [
        "API_2_TUPLE", "API_3_TUPLE", "API_5_TUPLE", "MOERAIL_TOPK_ROUTER_DOC", "MOE_UTILS_FUNCTIONS",
        "MoeUtilsPatch", "SERVED_DEVICE_TYPES", "apply_router_token_dropping", "compute_routing_scores_for_aux_loss",
        "get_capacity", "get_moe_module_spec", "get_updated_expert_bias", "is_patched", "megatron_api",
        "moe_utils_patched", "patch_moe_utils", "patch_stats", "permute_for", "permute_v011", "permute_v016",
        "permute_v017", "sequence_load_balancing_loss_func", "sort_chunks_by_idxs", "sort_chunks_by_idxs_v011",
        "switch_load_balancing_loss_func", "switch_load_balancing_loss_func_v011", "topk_routing_with_score_function",
        "topk_softmax_with_capacity", "unpatch_moe_utils", "unpermute_for", "unpermute_v016", "unpermute_v017",
        "update_expert_bias", "update_expert_placement", "use_moerail", "with_moerail_dispatcher",
        "with_moerail_router", "z_loss_func",
    ],
}

SUBPACKAGES = ["moerail.ops", "moerail.backends", "moerail.ep", "moerail.balance", "moerail.sim",
               "moerail.integrations.megatron"]

# Built on first access from the installed Megatron-Core.
LAZY = {"MoerailTopKRouter", "MoerailTokenDispatcher"}


def _fresh_import(name: str):
    sys.modules.pop(name, None)
    parent, _, child = name.rpartition(".")
    if hasattr(sys.modules[parent], child):
        delattr(sys.modules[parent], child)
    return importlib.import_module(name)


def test_every_name_of_moerail_all_resolves():
    assert len(moerail.__all__) == len(set(moerail.__all__))
    for name in moerail.__all__:
        assert getattr(moerail, name) is not None, name


def test_moerail_all_is_the_subpackages_api():
    """The top-level names are the subpackages' public names (plus the thread knobs)."""
    own = {"__version__", "get_num_threads", "set_num_threads"}
    for name in set(moerail.__all__) - own:
        homes = [p for p in SUBPACKAGES if name in importlib.import_module(p).__all__]
        assert homes, f"{name} is in no subpackage's __all__"
        assert getattr(moerail, name) is getattr(importlib.import_module(homes[0]), name)


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_subpackage_all_resolves(package):
    mod = importlib.import_module(package)
    assert len(mod.__all__) == len(set(mod.__all__))
    for name in mod.__all__:
        if name in LAZY:
            pytest.importorskip("megatron.core")
        assert getattr(mod, name) is not None, f"{package}.{name}"


@pytest.mark.parametrize("package", sorted(KEPT))
def test_kept_packages_export_the_old_public_names(package):
    mod = importlib.import_module(package)
    missing = [n for n in KEPT[package] if not hasattr(mod, n)]
    assert not missing, f"{package} lost {missing}"


def test_megatron_all_has_the_layer_helpers():
    from moerail.integrations import megatron as mi

    assert {"use_moerail", "with_moerail_dispatcher", "with_moerail_router", "MoerailTopKRouter"} <= set(mi.__all__)


def test_megatron_lazy_classes_live_on_the_package():
    pytest.importorskip("megatron.core")
    from moerail.integrations import megatron as mi

    for name in LAZY:
        assert getattr(mi, name).__module__ == "moerail.integrations.megatron"  # as before the split
    router = mi.MoerailTopKRouter
    assert getattr(sys.modules[router.__module__], router.__qualname__) is router  # pickle finds it


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_warn_and_give_the_same_objects(old):
    new, home, names = MOVED[old]
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated .* import from {new} "):
        mod = _fresh_import(old)
    target = importlib.import_module(home)
    for name in names:
        assert getattr(mod, name) is getattr(target, name), f"{old}.{name}"
    for name in getattr(mod, "__all__", []):
        assert getattr(mod, name) is getattr(target, name), f"{old}.{name}"
    for name, home in MOVED_PRIVATE.get(old, {}).items():
        assert getattr(mod, name) is getattr(importlib.import_module(home), name), f"{old}.{name}"
    with pytest.raises(AttributeError):
        mod.no_such_name  # noqa: B018


def test_from_import_of_old_paths():
    with pytest.warns(DeprecationWarning):
        sys.modules.pop("moerail.a2a", None)
        from moerail.a2a import AllToAllDispatcher, _compact
    from moerail.ep.plan import _compact as compact

    assert AllToAllDispatcher is moerail.AllToAllDispatcher and _compact is compact


def test_importing_moerail_warns_nothing(tmp_path):
    """The package itself never goes through a deprecated path."""
    import os
    import subprocess

    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import moerail, moerail.cli, moerail.integrations.megatron, moerail.integrations.mindspeed\n"
        "    import moerail.integrations.mindspore\n"
        "print([str(x.message) for x in w if 'will be removed in the next release' in str(x.message)])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE.parent), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


# Which parts each part may import (moerail._native, _checks and the stdlib are allowed everywhere).
LAYERS = {
    "backends": set(),
    "ops": {"backends"},
    "balance": set(),
    "sim": set(),
    "memory": {"sim"},
    "ep": {"ops", "backends", "balance"},
    "integrations": {"ops", "backends", "balance", "ep", "sim", "memory"},
}


def _moerail_imports(path: pathlib.Path):
    """The moerail parts a module of ``part`` imports (relative imports resolved)."""
    pkg = list(path.relative_to(PACKAGE).parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                mod = base + (node.module.split(".") if node.module else [])
                names = [mod] if node.module else [mod + [a.name] for a in node.names]
            elif node.module and node.module.split(".")[0] == "moerail":
                mod = node.module.split(".")[1:]
                names = [mod] if mod else [[a.name] for a in node.names]
            else:
                continue
            for n in names:
                if n:
                    yield n[0]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "moerail" and len(parts) > 1:
                    yield parts[1]


@pytest.mark.parametrize("part", sorted(LAYERS))
def test_parts_import_only_downwards(part):
    root = PACKAGE / part
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    assert files
    allowed = LAYERS[part] | {part, "_native", "_checks"}
    bad = sorted({(str(f.relative_to(PACKAGE)), p) for f in files for p in _moerail_imports(f)
                  if p in LAYERS and p not in allowed})
    assert not bad, f"{part} imports {bad}"


def test_megatron_integration_names_are_public():
    """What the README tells Megatron users to import is in the integration's ``__all__`` (so
    ``from moerail.integrations.megatron import *`` and the API reference have it)."""
    from moerail.integrations import megatron as mi

    for name in ("patch_moe_utils", "unpatch_moe_utils", "use_moerail", "with_moerail_dispatcher",
                 "with_moerail_router", "MoerailTopKRouter", "update_expert_bias", "update_expert_placement"):
        assert name in mi.__all__, name
    ns: dict = {}
    exec("from moerail.integrations.megatron import *", ns)
    assert {"use_moerail", "with_moerail_dispatcher", "patch_moe_utils"} <= set(ns)


def test_reprs_are_short():
    """Plans print as a line, not kilobytes of tensors."""
    import torch

    maps = [torch.rand(64, 16, generator=torch.Generator().manual_seed(r)) < 0.25 for r in range(8)]
    plan = moerail.plan_all_to_all(ranks_per_node=4, routing_maps=maps, hidden_size=1024)
    text = repr(plan)
    assert len(text) < 300 and text.startswith("AllToAllPlan(strategy=") and "\n" not in text
    cur = moerail.expand_placement(moerail.default_placement(2, 16, 8), 24, 8)
    new, _, _ = moerail.rebalance_experts(torch.arange(32.0).reshape(2, 16) + 1, 24, 1, 2, 8)
    mig = moerail.plan_migration(cur, new, 8, 2, expert_bytes=1e6)
    assert len(repr(mig)) < 300 and "transfers=" in repr(mig) and "\n" not in repr(mig)
