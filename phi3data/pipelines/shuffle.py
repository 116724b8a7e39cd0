"""The shuffle behind keyed global stages (dedup): key partitions, reduce tasks and connected components.

Every step is a set of tasks run with the pipeline's engine (``map_shards``: local processes, Ray tasks or Spark
partitions), reading and writing Parquet under the run's output directory, which every worker sees. A task's
outputs have deterministic names and are written atomically; the driver records each finished task in a marker
with the sha256 of every file it wrote. A rerun reuses a task only when its files are intact and redoes it
otherwise, so a run killed in any step resumes without losing or duplicating a row, and a corrupt intermediate
file is rebuilt instead of read.

Documents are graph nodes named ``<flag><id>\\x1f<shard>``: flag ``1`` for this run's documents, ``0`` for those of
an earlier corpus's index, so in string order an earlier document comes first and, among this run's, the
smallest id does (ids are compared as strings; ``\\x1f`` sorts below printable characters, so appending the
shard keeps the order of ids).

Connected components are found either on the driver (a numpy union-find over all edges, when they fit) or by
the large-star / small-star algorithm (Kiveris et al., 2014), each round two passes of partitioned tasks: the
same clusters either way (tested), and the smallest node of a cluster is its representative.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from phi3data.io.writers import write_json_atomic, write_parquet_atomic

EXTERNAL, OWN = "0", "1"
SEP = "\x1f"
KEYS_SCHEMA = pa.schema([pa.field("part", pa.int32()), pa.field("band", pa.int16()),
                         pa.field("key", pa.uint64()), pa.field("node", pa.string())])
EDGE_SCHEMA = pa.schema([pa.field("src", pa.string()), pa.field("dst", pa.string())])
RESOLVED_SCHEMA = pa.schema([pa.field("shard", pa.string()), pa.field("id", pa.string()),
                             pa.field("cluster", pa.string()), pa.field("size", pa.int64()),
                             pa.field("earlier", pa.bool_())])
MAX_ROUNDS = 64


def node_name(ids: list[str], shard: str, flag: str = OWN) -> list[str]:
    return [f"{flag}{i}{SEP}{shard}" for i in ids]


def parse_node(node: str) -> tuple[bool, str, str]:
    """(earlier, id, shard) of a node name."""
    doc, _, shard = node[1:].rpartition(SEP)
    return node[0] == EXTERNAL, doc, shard


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_parquet_hashed(table: pa.Table, path: Path, row_group_size: int | None = None) -> str:
    """Write ``table`` to ``path`` atomically; returns the file's sha256."""
    return sha256_file(write_parquet_atomic(table, path, row_group_size=row_group_size))


def partition_of(strings: pa.Array | pa.ChunkedArray, partitions: int) -> np.ndarray:
    """A stable partition number per string (xxh64), hashing each distinct value once."""
    encoded = pc.dictionary_encode(strings)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    hashes = np.array([xxhash.xxh64_intdigest(s) for s in encoded.dictionary.to_pylist()], dtype=np.uint64)
    return (hashes[encoded.indices.to_numpy(zero_copy_only=False)] % np.uint64(partitions)).astype(np.int32)


def document_keys(ids: list[str], key_sets: list) -> pa.Table:
    """A keys table in one band (band 0): each document's distinct keys, sorted, beside its id."""
    keys, owners = [], []
    for doc, mine in zip(ids, key_sets):
        mine = sorted(set(mine))
        keys.extend(mine)
        owners.extend([doc] * len(mine))
    return pa.table({"band": pa.array([0] * len(keys), pa.int16()), "key": pa.array(keys, pa.uint64()),
                     "id": pa.array(owners, pa.string())})


def write_keys(table: pa.Table, path: Path, partitions: int) -> str:
    """A shard's keyed rows, sorted by partition so a reduce task reads only its own row groups."""
    part = (table.column("key").to_numpy(zero_copy_only=False) % np.uint64(partitions)).astype(np.int32)
    table = table.append_column("part", pa.array(part, pa.int32())).select(KEYS_SCHEMA.names)
    table = table.cast(KEYS_SCHEMA).sort_by([("part", "ascending"), ("band", "ascending"), ("key", "ascending")])
    return write_parquet_hashed(table, path, row_group_size=max(1, min(65536, table.num_rows // partitions + 1)))


def read_part(files: list[str], part: int, columns: list[str], schema: pa.Schema) -> pa.Table:
    """Rows of one partition from partition-sorted files."""
    tables = [pq.read_table(f, columns=columns, filters=[("part", "=", part)]) for f in files]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table().select(columns)


def _distinct_edges(tables: list[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return EDGE_SCHEMA.empty_table()
    return pa.concat_tables(tables).group_by(["src", "dst"]).aggregate([]).select(["src", "dst"])


def _both_ways(src: pa.Array, dst: pa.Array) -> pa.Table:
    return pa.table({"src": pa.concat_arrays([src, dst]), "dst": pa.concat_arrays([dst, src])}, schema=EDGE_SCHEMA)


def _write_edges_by_src(edges: pa.Table, out: Path, name: str, partitions: int) -> dict[str, str]:
    """Write edges into one file per partition of their ``src`` (only non-empty ones); {path: sha256}."""
    files = {}
    if edges.num_rows == 0:
        return files
    parts = partition_of(edges.column("src"), partitions)
    for part in np.unique(parts):
        piece = edges.filter(pa.array(parts == part))
        path = out / f"p{int(part):05d}" / f"{name}.parquet"
        files[str(path)] = write_parquet_hashed(piece, path)
    return files


def _edge_digest(edges: pa.Table) -> list[int]:
    """Order-independent digest of a set of edges: [count, sum of edge hashes mod 2**64]."""
    total = 0
    for src, dst in zip(edges.column("src").to_pylist(), edges.column("dst").to_pylist()):
        total = (total + xxhash.xxh64_intdigest(f"{src}\n{dst}")) & 0xFFFFFFFFFFFFFFFF
    return [edges.num_rows, total]


@dataclass
class ShuffleJob:
    """What a keyed stage's ``resolve`` works with: its scratch directory, the shards' key files, the segment's
    data files (texts, for audits), and the engine to run tasks on."""

    work: Path
    output: Path
    stems: list[str]
    keys_files: list[Path]
    data_files: dict[str, Path]
    mapper: Callable[[Callable[[dict], dict], list[dict]], Iterator[dict]]

    def relative(self, path: Path) -> str:
        """A path as the decision records it: relative to the run's output directory."""
        return Path(path).relative_to(self.output).as_posix()

    def run(self, step: str, fn: Callable[[dict], dict], items: list[dict]) -> list[dict]:
        """Run ``fn`` over ``items`` (each with a unique ``task`` name) as engine tasks, in item order.

        ``fn`` returns a JSON-able dict whose ``files`` maps each path it wrote to its sha256. A task finished
        by an earlier attempt is reused when all its files are intact, and redone otherwise.
        """
        markers = self.work / step / "_done"
        results: dict[str, dict] = {}
        todo = []
        for item in items:
            marker = markers / f"{item['task']}.json"
            if marker.exists():
                result = json.loads(marker.read_text())
                if all(Path(p).exists() and sha256_file(Path(p)) == sha for p, sha in result["files"].items()):
                    results[item["task"]] = result
                    continue
                marker.unlink()  # a file changed or went missing since: rebuild it
            todo.append(item)
        markers.mkdir(parents=True, exist_ok=True)
        for result in self.mapper(fn, todo):
            write_json_atomic(markers / f"{result['task']}.json", result)
            results[result["task"]] = result
        return [results[item["task"]] for item in items]


# --- reduce: candidate groups -> edges ---------------------------------------------------------------------------


def reduce_groups(keys_files: list[str], index_files: list[str], out: str, partitions: int, item: dict) -> dict:
    """One key partition: documents sharing a (band, key) are candidates; link each to the group's smallest.

    Writes the edges (both directions, by ``src`` partition) and returns their files and counts."""
    part = item["part"]
    table = read_part(keys_files + index_files, part, ["band", "key", "node"], KEYS_SCHEMA)
    groups = table.group_by(["band", "key"]).aggregate([("node", "min"), ("node", "count_distinct")])
    groups = groups.filter(pc.greater_equal(groups.column("node_count_distinct"), 2))
    members = table.join(groups.select(["band", "key", "node_min"]), ["band", "key"], join_type="inner")
    members = members.filter(pc.not_equal(members.column("node"), members.column("node_min")))
    links = _distinct_edges([pa.table({"src": members.column("node_min"), "dst": members.column("node")},
                                      schema=EDGE_SCHEMA)])
    # links between two earlier documents are the earlier corpus's business, not this run's
    own = pc.or_(pc.starts_with(links.column("src"), OWN), pc.starts_with(links.column("dst"), OWN))
    links = links.filter(own)
    edges = _both_ways(links.column("src").combine_chunks(), links.column("dst").combine_chunks())
    files = _write_edges_by_src(edges, Path(out), f"from-{part:05d}", partitions)
    return {"task": item["task"], "files": files, "groups": groups.num_rows, "links": links.num_rows}


# --- connected components ----------------------------------------------------------------------------------------


def components_on_driver(edge_files: list[str]) -> pa.Table:
    """Every node's cluster (its component's smallest node) and the cluster's size, by a numpy union-find."""
    edges = _distinct_edges([pq.read_table(f) for f in edge_files])
    if edges.num_rows == 0:
        return pa.table({"node": pa.array([], pa.string()), "cluster": pa.array([], pa.string()),
                         "size": pa.array([], pa.int64())})
    names = pc.unique(pa.concat_arrays([edges.column("src").combine_chunks(), edges.column("dst").combine_chunks()]))
    names = names.take(pc.sort_indices(names))  # index order == string order: a component's smallest index is
    src = pc.index_in(edges.column("src"), value_set=names).to_numpy(zero_copy_only=False).astype(np.int64)
    dst = pc.index_in(edges.column("dst"), value_set=names).to_numpy(zero_copy_only=False).astype(np.int64)
    label = np.arange(len(names), dtype=np.int64)  # its smallest node
    while True:  # hook each edge's larger root under the smaller, then jump pointers to the roots
        before = label.copy()
        low = np.minimum(label[src], label[dst])
        np.minimum.at(label, label[src], low)
        np.minimum.at(label, label[dst], low)
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(before, label):
            break
    sizes = np.bincount(label, minlength=len(names))
    return pa.table({"node": names, "cluster": names.take(pa.array(label)),
                     "size": pa.array(sizes[label], pa.int64())})


def _read_edges(files: list[str]) -> pa.Table:
    return _distinct_edges([pq.read_table(f) for f in files])


def large_star(files: list[str], out: str, partitions: int, item: dict) -> dict:
    """Large star: connect every larger neighbour of a node to the smallest of the node and its neighbours."""
    edges = _read_edges(files)
    lowest = edges.group_by("src").aggregate([("dst", "min")])
    edges = edges.join(lowest, "src", join_type="inner")
    m = pc.if_else(pc.less(edges.column("dst_min"), edges.column("src")), edges.column("dst_min"),
                   edges.column("src"))
    edges = edges.append_column("m", m)
    larger = edges.filter(pc.greater(edges.column("dst"), edges.column("src")))
    out_edges = _both_ways(larger.column("dst").combine_chunks(), larger.column("m").combine_chunks())
    files_out = _write_edges_by_src(out_edges, Path(out), item["task"], partitions)
    return {"task": item["task"], "files": files_out, "digest": _edge_digest(edges.select(["src", "dst"]))}


def small_star(files: list[str], out: str, partitions: int, item: dict) -> dict:
    """Small star: connect a node and its smaller neighbours to the smallest of those neighbours."""
    edges = _read_edges(files)
    smaller = edges.filter(pc.less(edges.column("dst"), edges.column("src")))
    lowest = smaller.group_by("src").aggregate([("dst", "min")])
    smaller = smaller.join(lowest, "src", join_type="inner")
    others = smaller.filter(pc.not_equal(smaller.column("dst"), smaller.column("dst_min")))
    src = pa.concat_arrays([others.column("dst").combine_chunks(), lowest.column("src").combine_chunks()])
    dst = pa.concat_arrays([others.column("dst_min").combine_chunks(), lowest.column("dst_min").combine_chunks()])
    files_out = _write_edges_by_src(_both_ways(src, dst), Path(out), item["task"], partitions)
    return {"task": item["task"], "files": files_out}


def star_clusters(files: list[str], out: str, item: dict) -> dict:
    """After convergence every component is a star around its smallest node: emit each centre's cluster."""
    edges = _read_edges(files)
    lowest = edges.group_by("src").aggregate([("dst", "min"), ("dst", "count")])
    centres = lowest.filter(pc.greater(lowest.column("dst_min"), lowest.column("src")))
    members = edges.join(centres.select(["src", "dst_count"]), "src", join_type="inner")
    node = pa.concat_arrays([centres.column("src").combine_chunks(), members.column("dst").combine_chunks()])
    cluster = pa.concat_arrays([centres.column("src").combine_chunks(), members.column("src").combine_chunks()])
    size = pc.add(pa.concat_arrays([centres.column("dst_count").combine_chunks(),
                                    members.column("dst_count").combine_chunks()]), 1)
    table = pa.table({"node": node, "cluster": cluster, "size": pc.cast(size, pa.int64())})
    path = Path(out) / f"{item['task']}.parquet"
    return {"task": item["task"], "files": {str(path): write_parquet_hashed(table, path)}}


def components_distributed(job: ShuffleJob, edge_files: dict[str, str], partitions: int) -> tuple[pa.Table, int]:
    """Large-star / small-star rounds as engine tasks until the edge set stops changing; (clusters, rounds)."""
    current = list(edge_files)
    previous_digest = None
    for round_no in range(MAX_ROUNDS):
        step = f"cc/r{round_no:03d}"
        for phase, fn in (("large", large_star), ("small", small_star)):
            out = job.work / step / phase
            items = [{"task": f"p{p:05d}", "part": p} for p in range(partitions)]
            results = job.run(f"{step}/{phase}", _partitioned(fn, current, str(out), partitions), items)
            if phase == "large":
                digest = [sum(r["digest"][0] for r in results),
                          sum(r["digest"][1] for r in results) & 0xFFFFFFFFFFFFFFFF]
            current = [p for r in results for p in r["files"]]
        if digest == previous_digest:
            break
        previous_digest = digest
    else:
        raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
    out = job.work / "cc" / "clusters"
    items = [{"task": f"p{p:05d}", "part": p} for p in range(partitions)]
    results = job.run("cc/clusters", _partitioned(star_clusters, current, str(out), None), items)
    tables = [pq.read_table(p) for r in results for p in r["files"]]
    return pa.concat_tables(tables), round_no + 1


def _partitioned(fn: Callable, files: list[str], out: str, partitions: int | None) -> Callable[[dict], dict]:
    """``fn`` bound to the files of the item's partition (paths end in ``p<part>/<name>.parquet``)."""
    return functools.partial(_run_partition, fn, files, out, partitions)


def _run_partition(fn: Callable, files: list[str], out: str, partitions: int | None, item: dict) -> dict:
    mine = [f for f in files if Path(f).parent.name == f"p{item['part']:05d}"]
    return fn(mine, out, partitions, item) if partitions is not None else fn(mine, out, item)


def resolved_rows(clusters: pa.Table) -> pa.Table:
    """This run's documents in clusters, with shard, id, representative id and whether it is an earlier one."""
    rows = {name: [] for name in RESOLVED_SCHEMA.names}
    for node, cluster, size in zip(clusters.column("node").to_pylist(), clusters.column("cluster").to_pylist(),
                                   clusters.column("size").to_pylist()):
        earlier, doc, shard = parse_node(node)
        if earlier:
            continue
        rep_earlier, rep, _ = parse_node(cluster)
        rows["shard"].append(shard)
        rows["id"].append(doc)
        rows["cluster"].append(rep)
        rows["size"].append(size)
        rows["earlier"].append(rep_earlier)
    return pa.table(rows, schema=RESOLVED_SCHEMA).sort_by([("shard", "ascending"), ("id", "ascending")])


def read_shard_rows(files: list[str], shard: str) -> pa.Table:
    """The rows of one shard from files sorted by a ``shard`` column (only its row groups are read)."""
    tables = [pq.read_table(f, filters=[("shard", "=", shard)]) for f in files]
    if not tables:
        raise ValueError("no resolved files to read")
    return pa.concat_tables(tables)
