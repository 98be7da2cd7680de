"""Megatron-LM's ``pretrain_gpt.py`` with moerail switched on.

    MEGATRON_LM=/path/to/Megatron-LM torchrun ... moerail_pretrain_gpt.py <pretrain_gpt.py's flags>

Runs ``$MEGATRON_LM/pretrain_gpt.py`` unchanged, after the two lines that switch moerail on (copy
them to the top of your own ``pretrain_gpt.py`` instead if you prefer)::

    from moerail.integrations import megatron as moerail_megatron
    moerail_megatron.patch_moe_utils()

Every Megatron-Core ``moe_utils`` function moerail implements (router top-k, token dropping, aux
losses, permute / unpermute, sort_chunks) then runs on moerail's ops, in the stock ``MoELayer``.
Calls with ``fused=True`` (``--moe-permute-fusion``, ``--moe-router-fusion``) stay on
TransformerEngine's kernels unless ``MOERAIL_SERVE_FUSED=1``.

``MOERAIL_DISPATCHER=auto`` (or ``flat``, ``2dh``, ``dedup``, ``allgather``) also gives every
``MoELayer`` moerail's router and expert-parallel ``AllToAllDispatcher``
(``moerail.integrations.megatron.use_moerail``); ranks per node come from torchrun's
``LOCAL_WORLD_SIZE``.
"""

import functools
import os
import runpy
import sys

from moerail.integrations import megatron as moerail_megatron

moerail_megatron.patch_moe_utils()

strategy = os.environ.get("MOERAIL_DISPATCHER")
if strategy:
    from megatron.core.transformer.moe.moe_layer import MoELayer

    init = MoELayer.__init__

    @functools.wraps(init)
    def _init_with_moerail(self, *args, **kwargs):
        init(self, *args, **kwargs)
        moerail_megatron.use_moerail(self, strategy=strategy)

    MoELayer.__init__ = _init_with_moerail

megatron_lm = os.path.abspath(os.environ.get("MEGATRON_LM", "."))
script = os.path.join(megatron_lm, "pretrain_gpt.py")
if not os.path.isfile(script):
    sys.exit(f"MEGATRON_LM: no pretrain_gpt.py in {megatron_lm} (set MEGATRON_LM to your Megatron-LM checkout)")
sys.path.insert(0, megatron_lm)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
