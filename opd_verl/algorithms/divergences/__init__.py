"""Per-token divergences between a student policy πs and a teacher πt (pure torch, no verl).

Notation for a response token t: s_t = log πs(x_t | x_<t), q_t = log πt(x_t | x_<t).

Supports of the divergence:

* ``sampled``: only the sampled token's log-probs (`sampled_reverse_kl`: the value; `sampled_kl_surrogate`: the
  per-token loss whose gradient each estimator uses: what each sampled estimator optimises is in `sampled`).
* ``topk``: the teacher's top-k tokens plus one tail bucket holding the remaining mass (`topk_divergence`, the
  reference, and the memory-bounded `chunked_topk_divergence` with `chunked_teacher_topk`).
* ``full``: the whole vocabulary (`full_divergence`, and the memory-bounded `chunked_full_divergence` /
  `chunked_divergence_from_hidden`).

Divergences (``reverse_kl`` = KL(πs‖πt), ``forward_kl`` = KL(πt‖πs), ``jsd``): the generalized JSD of GKD
(arXiv 2306.13649) / TRL's ``generalized_jsd_loss``: m = β·πt + (1−β)·πs,
JSD_β = β·KL(πt‖m) + (1−β)·KL(πs‖m); β = 0 is forward KL exactly and β = 1 reverse KL exactly.

Conventions: a term p·(log p − log r) is 0 where p = 0 (masked vocabulary entries with −inf logits give
no NaN). A KL whose first distribution puts mass where the second has none is +inf, as in the math
(e.g. reverse KL when only the teacher masks a token the student can emit); its gradient is then not
finite either. The teacher is always a constant (detached). Values are computed in at least float32.

Where each lives: `core` (the divergence over log-probs and the checks of the top-k and full paths), `sampled`,
`reference` (`full_divergence`), `chunked_full`, `hidden_states`, `topk`, and `passes` (the pass-by-pass machinery
of the chunked paths).
"""

from opd_verl.algorithms.divergences.chunked_full import chunked_full_divergence
from opd_verl.algorithms.divergences.core import DIVERGENCES, SUPPORTS
from opd_verl.algorithms.divergences.hidden_states import chunked_divergence_from_hidden
from opd_verl.algorithms.divergences.reference import full_divergence
from opd_verl.algorithms.divergences.sampled import (
    KL_ESTIMATORS,
    leave_one_out_baseline,
    sampled_kl_surrogate,
    sampled_reverse_kl,
    sanitize_teacher_logp,
)
from opd_verl.algorithms.divergences.topk import (
    chunked_teacher_topk,
    chunked_topk_divergence,
    topk_divergence,
    topk_overlap,
)

__all__ = [
    "DIVERGENCES",
    "KL_ESTIMATORS",
    "SUPPORTS",
    "chunked_divergence_from_hidden",
    "chunked_full_divergence",
    "chunked_teacher_topk",
    "chunked_topk_divergence",
    "full_divergence",
    "leave_one_out_baseline",
    "sampled_kl_surrogate",
    "sampled_reverse_kl",
    "sanitize_teacher_logp",
    "topk_divergence",
    "topk_overlap",
]
