"""opd.multi_teacher_mode=route: a teacher per data_source."""

from __future__ import annotations

from collections.abc import Mapping

from opd_verl.checks.errors import OPDConfigError

ROUTE_DEFAULT = "*"


def route_table(entries: list[Mapping]) -> dict[str, int]:
    """{data_source: teacher index} for multi_teacher_mode=route; a teacher's data_source is a name, a list of
    names, or "*" (every data_source no other teacher claims)."""
    table: dict[str, int] = {}
    for i, entry in enumerate(entries):
        sources = entry.get("data_source")
        if isinstance(sources, str):
            sources = [sources]
        if not sources or not all(isinstance(s, str) and s for s in sources):
            raise OPDConfigError(
                f"opd.teachers[{i}] has no data_source; with opd.multi_teacher_mode=route write each teacher as "
                f"{{path: ..., data_source: <name, list of names, or \"{ROUTE_DEFAULT}\">}}"
            )
        for source in sources:
            if source in table:
                raise OPDConfigError(
                    f"opd.teachers[{i}] routes data_source {source!r}, already routed to opd.teachers[{table[source]}]; "
                    "give each data_source one teacher"
                )
            table[source] = i
    return table


def route_teacher_indices(sources: list[str], table: Mapping[str, int]) -> list[int]:
    """The teacher index of each sample's data_source; raises on a data_source no teacher is routed to."""
    indices = []
    for source in sources:
        index = table.get(str(source), table.get(ROUTE_DEFAULT))
        if index is None:
            routed = ", ".join(sorted(table))
            raise OPDConfigError(
                f"data_source {source!r} has no teacher (opd.multi_teacher_mode=route routes {routed}); add it to a "
                f"teacher's data_source, or give one teacher data_source: \"{ROUTE_DEFAULT}\""
            )
        indices.append(index)
    return indices
