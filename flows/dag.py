"""The stage graph, read from DVC's own index (dvc.yaml), never written a second time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class GraphError(Exception):
    """dvc.yaml cannot be read as a pipeline (parse error, cycle, unknown stage)."""


@dataclass(frozen=True)
class StageGraph:
    order: tuple[str, ...]  # topological: every stage after all of its upstream stages
    upstream: dict[str, tuple[str, ...]]  # stage -> stages whose outputs it reads
    metrics: dict[str, tuple[str, ...]]  # stage -> its metrics files, relative to the repo root
    outs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stage -> every output, as metrics
    always_changed: tuple[str, ...] = ()  # stages DVC runs every time (`always_changed: true`)

    def scope(self, target: str | None) -> list[str]:
        """The stages a run up to `target` covers (all of them without a target), in order."""
        if target is None:
            return list(self.order)
        keep = self.ancestors(target) | {target}
        return [s for s in self.order if s in keep]

    def ancestors(self, name: str) -> set[str]:
        """The stages `name` needs, directly or not (excluding itself)."""
        seen: set[str] = set()
        todo = list(self.upstream[name])
        while todo:
            cur = todo.pop()
            if cur not in seen:
                seen.add(cur)
                todo.extend(self.upstream[cur])
        return seen


def stage_name(stage, root_dir: str) -> str:
    """A stage's name as `dvc repro` takes it from the repo root: `name` for the root dvc.yaml,
    `sub/dvc.yaml:name` for a nested one (DVC's own `addressing` is relative to the current folder)."""
    import os

    dvcfile = os.path.relpath(stage.dvcfile.path, root_dir)
    return stage.name if dvcfile == "dvc.yaml" else f"{Path(dvcfile).as_posix()}:{stage.name}"


def read_graph(root: str | Path = ".") -> StageGraph:
    """Build the graph from DVC's index of `root`: only pipeline stages (not `.dvc` files)."""
    return inspect_pipeline(root, with_status=False)[0]


def inspect_pipeline(root: str | Path = ".", with_status: bool = True) -> tuple[StageGraph, set[str]]:
    """The graph and, with `with_status`, the changed stages: one DVC repo opened, one in-process
    status pass, no subprocess per stage."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    try:
        with Repo(str(root)) as repo:
            graph = repo.index.graph
            stages = [s for s in graph.nodes if isinstance(s, PipelineStage)]
            names = {s: stage_name(s, repo.root_dir) for s in stages}
            # DVC's edges point from a stage to the stage it depends on.
            upstream = {names[s]: tuple(sorted(names[d] for d in graph.successors(s) if d in names)) for s in stages}
            metrics = {names[s]: tuple(sorted(o.def_path for o in s.outs if o.metric)) for s in stages}
            outs = {names[s]: tuple(sorted(o.def_path for o in s.outs)) for s in stages}
            always = tuple(sorted(names[s] for s in stages if s.always_changed))
            changed: set[str] = set()
            if with_status:
                with repo.lock:
                    changed = {names[s] for s in stages if s.status(check_updates=True)}
    except DvcException as exc:
        raise GraphError(f"{root}: cannot read the DVC pipeline: {exc}") from exc
    dag = nx.DiGraph()
    dag.add_nodes_from(upstream)
    dag.add_edges_from((u, s) for s, ups in upstream.items() for u in ups)
    if not nx.is_directed_acyclic_graph(dag):
        cycle = nx.find_cycle(dag)
        raise GraphError(f"dvc.yaml: cycle of {len(cycle)} edges among {len(upstream)} stages: {cycle}")
    order = tuple(nx.lexicographical_topological_sort(dag))
    return StageGraph(order=order, upstream=upstream, metrics=metrics, outs=outs, always_changed=always), changed


def plan(graph: StageGraph, changed: set[str], force: bool = False, target: str | None = None) -> list[str]:
    """Stages to run, in order: the changed ones and everything downstream of them (all of them with
    `force`), restricted to `target` and its ancestors when a target is given."""
    if target is not None and target not in graph.upstream:
        raise GraphError(f"unknown stage {target!r}; stages in dvc.yaml: {', '.join(graph.order)}")
    run: list[str] = []
    for name in graph.scope(target):
        if force or name in changed or any(u in run for u in graph.upstream[name]):
            run.append(name)
    return run
