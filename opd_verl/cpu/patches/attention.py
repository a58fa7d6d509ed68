"""The attention kernel a CPU run uses under verl 0.9.1's Ulysses sequence parallel (transformers 5.10.4).

    cpu_varlen_attention   transformers/modeling_flash_attention_utils.py: _lazy_imports (the flash kernel lookup)

Acts only for its own attn_implementation name (opd_verl.cpu.varlen_attention.ATTN_IMPLEMENTATION); every other
name reaches transformers' lookup unchanged, on every platform.
"""

from __future__ import annotations

from opd_verl.patches import _register

_FA_UTILS = "transformers.modeling_flash_attention_utils"


# --- transformers 5.10.4: without flash-attn, `_lazy_imports` sends any name it does not know to the hub-kernel
# fallback (a download). For our name it returns the pure-torch kernels of opd_verl.cpu.varlen_attention; the name is
# also registered in AttentionInterface (transformers' flash_attention_forward, whose `_flash_attention_forward` verl's
# apply_monkey_patch replaces by its Ulysses all-to-all wrapper whatever the name) and AttentionMaskInterface (the
# flash mask). Applied once transformers.modeling_utils is imported (it imports both flash modules).
@_register(
    "cpu_varlen_attention",
    "transformers.modeling_utils",
    "transformers",
    "5.10.4",
    "verl's Ulysses SP wraps transformers' flash-attention path only; without flash-attn that path has no CPU kernel",
    {
        # the lookup we wrap (its return layout), its caller (looks it up at call time), and what it builds from our
        # varlen function's signature (the kwargs that reach our kernels)
        f"{_FA_UTILS}:_lazy_imports": "4762d5ad795e01680afa3f66ec5590c71935c923fd0c605a452bb9f81e36b35f",
        f"{_FA_UTILS}:lazy_import_flash_attention": "2c161e8bdd39e0968c697835f56eae74f4ba3705f73a1b65ad53dc4578e7ff29",
        f"{_FA_UTILS}:_lazy_define_process_function": "52ca682b623ef736cd552321cefa16be722317430ebd5b9a5b811c005627bf9f",
        f"{_FA_UTILS}:_process_flash_attention_kwargs": "c7bc81f52ff6123232b8c59e8c3a9f6db098256777464e73bd16458731df7efb",
        # how the kernels are called (packed rows: varlen from position_ids; 2-D mask: unpad/varlen/pad; else dense)
        f"{_FA_UTILS}:_flash_attention_forward": "012748d5e2d7717f9337d11d090ab8ec89b151f1d1e66049ba9f0464016af429",
        "transformers.integrations.flash_attention:flash_attention_forward": "4db26ba8b5f83a5fca2d19caaaf7988017edd5182078990ebef955db39dcd97e",
        "transformers.masking_utils:flash_attention_mask": "11b0581480c562ba74effb5b72f6e92222abfa49a549a1bdf761275ebb0bea09",
        # the name is validated as a registered non-flash name ("flash" in it would trigger flash-attn checks)
        "transformers.modeling_utils:PreTrainedModel._check_and_adjust_attn_implementation": "3c5ecebcf82208cde2e18ec9692ab4e316c053484773fe047482e13c51e21056",
        "transformers.modeling_utils:PreTrainedModel.get_correct_attn_implementation": "729536300043499538bd7ab41aad1880c99dd888f73c2a65dc993649d957e982",
        "transformers.utils.generic:is_flash_attention_requested": "fb820434def6c42d5a7974d1588ef2b3f53899f7fd464bcc994d71df25744594",
        # verl 0.9.1 replaces flash_attention._flash_attention_forward (any attn name) by its Ulysses wrapper
        "verl.models.transformers.monkey_patch:apply_monkey_patch": "bcb97910d0dd43c842d7ea894dbafe0038074a2ad387e796f42893413473ad40",
        "verl.models.transformers.monkey_patch:_ulysses_flash_attention_forward": "eb8a7911365dddea2e456b657d1334e2d93e83c7f2ce59e28cf468c20e8a6656",
    },
)
def _patch_cpu_varlen_attention(module) -> None:
    from opd_verl.cpu.varlen_attention import register

    register()
