"""The teachers' placement (opd.teacher_pool, opd.teacher.engine): checks before Ray.

Colocated (both pool sizes null, the default): the teachers share the student's GPUs in verl's reference role.
A pool: the teachers in verl's RefPolicy role on a Ray resource pool of their own (opd_verl.verl_ext.trainer).
Every check raises OPDConfigError with one line naming the key and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping

from opd_verl.checks.errors import OPDConfigError
from opd_verl.checks.modes import uses_distill_loss, uses_opd

POOL_KEYS = ("n_gpus_per_node", "nnodes")
ENGINES = ("fsdp", "vllm")
REF = "actor_rollout_ref.ref"


def pool_shape(opd: Mapping) -> tuple[int, int] | None:
    """(n_gpus_per_node, nnodes) of the teachers' own pool; None when they are colocated."""
    pool = opd.get("teacher_pool") or {}
    values = {key: pool.get(key) for key in POOL_KEYS}
    if all(v is None for v in values.values()):
        return None
    missing = [key for key, v in values.items() if v is None]
    if missing:
        given = next(key for key in POOL_KEYS if key not in missing)
        raise OPDConfigError(
            f"opd.teacher_pool.{given} is set but opd.teacher_pool.{missing[0]} is not; set both (a pool of "
            f"n_gpus_per_node x nnodes GPUs), or neither (colocated)")
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OPDConfigError(f"opd.teacher_pool.{key}={value!r} must be an integer >= 1")
    return values["n_gpus_per_node"], values["nnodes"]


def pool_gpus(config: Mapping) -> int:
    """GPUs of the teachers' own pool (0 when colocated or without OPD)."""
    opd = config.get("opd") or {}
    shape = pool_shape(opd)
    return 0 if shape is None else shape[0] * shape[1]


def check_engine(opd: Mapping) -> None:
    engine = (opd.get("teacher") or {}).get("engine", "fsdp")
    if engine not in ENGINES:
        raise OPDConfigError(f"opd.teacher.engine={engine!r} is not one of {', '.join(ENGINES)}; set opd.teacher.engine=fsdp")


def _ref(config: Mapping, *keys: str, default=None):
    node = config.get("actor_rollout_ref", {}).get("ref", {})
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return default if node is None else node


def check_parallel_against_pool(config: Mapping, gpus: int) -> None:
    """The teachers' FSDP settings (actor_rollout_ref.ref) against the pool's GPU count."""
    sp = max(int(_ref(config, "ulysses_sequence_parallel_size", default=1)),
             int(_ref(config, "fsdp_config", "ulysses_sequence_parallel_size", default=1)))
    if gpus % sp:
        raise OPDConfigError(f"{REF}.ulysses_sequence_parallel_size={sp} does not divide the teacher pool's {gpus} GPUs "
                             "(opd.teacher_pool.n_gpus_per_node x nnodes); choose a divisor")
    fsdp_size = int(_ref(config, "fsdp_config", "fsdp_size", default=-1))
    if fsdp_size > 0 and gpus % fsdp_size:
        raise OPDConfigError(f"{REF}.fsdp_config.fsdp_size={fsdp_size} does not divide the teacher pool's {gpus} GPUs "
                             "(opd.teacher_pool.n_gpus_per_node x nnodes); choose a divisor, or -1 (all of them)")
    strategy = _ref(config, "strategy", default="fsdp")
    if strategy not in ("fsdp", "fsdp2"):
        raise OPDConfigError(f"{REF}.strategy={strategy}: opd.teacher_pool runs the teachers on verl's FSDP engine; "
                             "set it to fsdp or fsdp2")
    if _ref(config, "fsdp_config", "param_offload", default=False):
        raise OPDConfigError(f"{REF}.fsdp_config.param_offload=true: on opd.teacher_pool the teachers stay resident "
                             "on their own GPUs (nothing to offload to make room for); drop it")


def check_pool_fits(trainer_gpus: int, teacher_gpus: int, available: int | None, where: str) -> None:
    """The student's and the teachers' pools together against the GPUs Ray will have (when known)."""
    if available is not None and trainer_gpus + teacher_gpus > available:
        raise OPDConfigError(
            f"{where}={available} GPUs cannot hold the student's pool (trainer.n_gpus_per_node x nnodes = "
            f"{trainer_gpus}) and the teacher pool (opd.teacher_pool: {teacher_gpus}) side by side; raise {where}, "
            "or shrink opd.teacher_pool")


def known_cluster_gpus(config: Mapping) -> tuple[int | None, str]:
    """The GPUs Ray starts with when the config says (ray_kwargs.ray_init.num_gpus), else (None, key)."""
    key = "ray_kwargs.ray_init.num_gpus"
    ray_init = (config.get("ray_kwargs") or {}).get("ray_init") or {}
    value = ray_init.get("num_gpus")
    return (None if value is None else int(value)), key


def check_placement_modes(config: Mapping) -> None:
    """The pool serves a teacher run: the reference pass (the advantage path, the loss-level support=sampled),
    the loss-level support=topk (the pool sends the loss its top-k) and support=full (the teachers' final hidden
    states, to which the student's process applies their output heads: `check_teacher_heads`)."""
    if not uses_opd(config):
        raise OPDConfigError("opd.teacher_pool is set but no teacher runs (algorithm.adv_estimator is not opd|opd_hybrid "
                             "and the actor loss is not ppo_plus_distill); drop opd.teacher_pool")
    if uses_distill_loss(config) and config["opd"]["support"] == "full":
        check_teacher_heads(config["opd"])


def check_teacher_heads(opd: Mapping) -> None:
    """support=full on a pool: each teacher's output head (what its architecture applies after the last hidden
    state) must be one the student's process reproduces (opd_verl.algorithms.output_head), by its config.json.
    A hub teacher whose config.json cannot be had here is checked when its head loads."""
    from opd_verl.algorithms.output_head import head_ops
    from opd_verl.checks.teachers import teacher_entries
    from opd_verl.checks.preflight import FilesUnavailable, model_config

    for i, entry in enumerate(teacher_entries(opd)):
        key = f"opd.teachers[{i}].path" if opd.get("teachers") else "opd.teacher.path"
        try:
            model = model_config(entry["path"])
        except FilesUnavailable:
            continue
        try:
            head_ops(model or {"model_type": "llama"})  # no config.json: check_model_path names it
        except ValueError as err:
            raise OPDConfigError(
                f"{key}={entry['path']}: opd.teacher_pool with opd.support=full rebuilds the teacher's logits from "
                f"its final hidden states in the student's process, but its {err}; drop opd.teacher_pool (colocated: "
                "the teacher's own forward gives its logits), or keep the pool with opd.support=topk") from None


def check_teacher_placement(config: Mapping) -> None:
    """All placement checks on a composed config (plain containers), before Ray."""
    from opd_verl.checks.served_teacher import check_fsdp_engine_reads_no_inference, check_served_teacher

    opd = config["opd"]
    check_engine(opd)
    shape = pool_shape(opd)
    served = (opd.get("teacher") or {}).get("engine", "fsdp") == "vllm"
    if served:
        check_served_teacher(config, shape)
    else:
        check_fsdp_engine_reads_no_inference(opd)
    if shape is None:
        return
    gpus = shape[0] * shape[1]
    if not served:  # a served teacher's placement: opd_verl.checks.served_teacher
        check_placement_modes(config)
        check_parallel_against_pool(config, gpus)
    trainer = config["trainer"]
    available, key = known_cluster_gpus(config)
    check_pool_fits(int(trainer["n_gpus_per_node"]) * int(trainer["nnodes"]), gpus, available, key)


def placement_note(opd: Mapping) -> str | None:
    """The one line main_opd prints about a pool (None when colocated)."""
    shape = pool_shape(opd)
    if shape is None:
        return None
    if (opd.get("teacher") or {}).get("engine", "fsdp") == "vllm":
        return (f"the teacher served by verl's teacher pool (vLLM): opd.teacher_pool {shape[0]} GPU(s) x {shape[1]} "
                "node(s); q_t = its log-prob of each sampled token, scored as each rollout finishes")
    return (f"teachers on a pool of their own: opd.teacher_pool {shape[0]} GPU(s) x {shape[1]} node(s), parameters "
            "resident there (no CPU offload); the student keeps trainer.n_gpus_per_node x nnodes")
