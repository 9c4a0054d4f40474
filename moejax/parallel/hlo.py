"""The collectives a compiled program runs, read from its HLO text (`compiled.as_text()`).

A compiled step's communication is what decides whether it scales: an expert-parallel step should
exchange tokens with all-to-all and never all-gather the expert weights. `collectives` lists every
collective of the program with its result shapes and the bytes it produces per step, so tests can
assert on the communication and `moejax.parallel.aot` can print it.

"Bytes" here are the bytes of the collective's *result on one chip*, times the number of times
it runs per step: an all-gather producing `bf16[64, 1024]` counts 131072 bytes per execution,
whatever part of that the chip already held; an all-reduce counts its (unchanged) result size; an
all-to-all the sum of its results; a ragged-all-to-all its whole output buffer (an upper bound on
what it sends). It is a size, not a wire-traffic model (no ring factors, no topology).

Executions per step follow the call graph: a collective in a `while` body with a
`known_trip_count` runs that many times per run of the loop; a collective in a conditional branch
is counted as if every branch ran (an upper bound); a loop without a known trip count counts once.
Asynchronous pairs (`all-gather-start` / `all-gather-done`, ...) are counted once, with the shapes
of their `-done`; collectives wrapped in `async-start` computations are counted where they are
defined, as the wrapped computation runs once per `async-start`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

KINDS = (
    "all-to-all",
    "ragged-all-to-all",
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "collective-permute",
)
_ASYNC_KINDS = (
    "all-gather",
    "all-reduce",
    "collective-permute",
    "all-to-all",
    "ragged-all-to-all",
    "reduce-scatter",
)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program.

    kind: one of `KINDS` ("-start" forms are reported under their base kind).
    name: the HLO instruction name (of the `-start` for an async pair).
    shapes: the result array shapes on one chip, e.g. `((8, 1024),)`; an all-to-all on several
        operands has one per operand.
    dtypes: the element type of each result, HLO spelling ("bf16", "f32", ...).
    executions: how many times it runs per step (while-loop trip counts multiplied in).
    bytes: result bytes on one chip per step: sum over `shapes` of elements x element size,
        times `executions` (see the module docstring).
    replica_groups: the HLO text of its device groups (`replica_groups=` or, for
        collective-permute, `source_target_pairs=`), "" when absent.
    op_name: the JAX operation it came from (HLO metadata, e.g. "jit(train_step)/.../ffn/..."),
        "" when absent; a collective the partitioner inserted names the op it feeds.
    """

    kind: str
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    executions: int
    bytes: int
    replica_groups: str
    op_name: str = ""


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    shape_text: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_CALLEES = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_OP_NAME = re.compile(r'\bop_name="([^"]*)"')
_GROUPS = re.compile(r"\b(replica_groups|source_target_pairs)=(mesh\[[^\]]*\]\s*\{[^}]*\}|\S+)")


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective in `hlo_text` (the output of `compiled.as_text()`), in program order
    within each computation, computations in the order they are printed."""
    computations, entry = _parse(hlo_text)
    executions = _executions(computations, entry)
    found = []
    for computation, instructions in computations.items():
        count = executions.get(computation, 0)
        if count == 0:
            continue
        by_name = {instruction.name: instruction for instruction in instructions}
        for instruction in instructions:
            collective = _as_collective(instruction, by_name, count)
            # A collective over groups of one device moves nothing: XLA:CPU keeps those (a psum
            # over a mesh axis of size 1) where the TPU compiler removes them.
            if collective is not None and group_size(collective.replica_groups) != 1:
                found.append(collective)
    return found


def group_size(replica_groups: str) -> int | None:
    """Devices per group of a `replica_groups` attribute text, None when it does not say.

    Three spellings: `mesh['data'=2,'expert'=4] {'expert'}` (the product of the named axes'
    sizes), `{{0,1},{2,3}}` (the first group's length) and `[2,4]<=[8]` (an iota: the last
    dimension of the group array).
    """
    named = re.fullmatch(r"mesh\[([^\]]*)\]\s*\{([^}]*)\}", replica_groups)
    if named:
        sizes = {name: int(size) for name, size in re.findall(r"'([^']+)'=(\d+)", named[1])}
        return math.prod(sizes[name] for name in re.findall(r"'([^']+)'", named[2]))
    listed = re.match(r"\{\{([^}]*)\}", replica_groups)
    if listed:
        return len([device for device in listed[1].split(",") if device.strip()])
    iota = re.match(r"\[([\d,]+)\]<=", replica_groups)
    if iota:
        return int(iota[1].split(",")[-1])
    return None


def bytes_by_kind(found: Iterable[Collective]) -> dict[str, int]:
    """Result bytes per step summed per kind, every kind of `KINDS` present (0 when absent)."""
    totals = dict.fromkeys(KINDS, 0)
    for collective in found:
        totals[collective.kind] += collective.bytes
    return totals


def of_kind(found: Iterable[Collective], kind: str) -> list[Collective]:
    """The collectives of one kind; `kind` must be one of `KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"collective kind {kind!r} is not one of {', '.join(KINDS)}")
    return [collective for collective in found if collective.kind == kind]


def gathers_of(found: Iterable[Collective], shape: Sequence[int]) -> list[Collective]:
    """All-gathers with a result of exactly `shape`, size-1 dimensions ignored on both sides
    (the compiler adds and drops them freely around collectives).

    "The step never all-gathers the full expert weights `[num_experts, d_model, expert_d_ff]`"
    is `not gathers_of(found, (num_experts, d_model, expert_d_ff))`; check the per-chip shapes
    with the non-expert dimensions still sharded too (`(num_experts, d_model // fsdp, ...)`), as
    the compiler may gather the expert axis alone.
    """
    wanted = _squeeze(tuple(shape))
    return [
        collective
        for collective in of_kind(found, "all-gather")
        if any(_squeeze(result) == wanted for result in collective.shapes)
    ]


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(size for size in shape if size != 1)


def _parse(hlo_text: str) -> tuple[dict[str, list[_Instruction]], str]:
    """{computation name: its instructions} and the entry computation's name."""
    computations: dict[str, list[_Instruction]] = {}
    entry = ""
    current: list[_Instruction] | None = None
    for line in hlo_text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and "=" not in line.split("(", 1)[0]:
                current = computations.setdefault(match.group(2), [])
                if match.group(1):
                    entry = match.group(2)
            continue
        if line.strip() == "}":
            current = None
            continue
        instruction = _parse_instruction(line)
        if instruction is not None:
            current.append(instruction)
    if not entry:
        raise ValueError("HLO text has no ENTRY computation; pass compiled.as_text()")
    return computations, entry


def _parse_instruction(line: str) -> _Instruction | None:
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    name, rest = match.groups()
    shape_end = _matching_paren(rest, 0) + 1 if rest.startswith("(") else rest.find(" ")
    if shape_end <= 0:
        return None
    shape_text = rest[:shape_end]
    rest = rest[shape_end:].lstrip()
    opcode_end = rest.find("(")
    if opcode_end <= 0:
        return None
    opcode = rest[:opcode_end]
    operands_end = _matching_paren(rest, opcode_end)
    operands = tuple(re.findall(r"%([\w.\-]+)", rest[opcode_end:operands_end]))
    return _Instruction(name, shape_text, opcode, operands, rest[operands_end + 1 :])


def _matching_paren(text: str, start: int) -> int:
    """Index of the ")" that closes the "(" at `start` (or the end of `text`)."""
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index
    return len(text)


def _executions(computations: dict[str, list[_Instruction]], entry: str) -> dict[str, int]:
    """How many times each computation runs per run of `entry`."""
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for computation, instructions in computations.items():
        for instruction in instructions:
            # async-update / async-done name the computation their async-start already runs.
            if instruction.opcode in ("async-update", "async-done"):
                continue
            factor = 1
            if instruction.opcode == "while":
                trip = _TRIP_COUNT.search(instruction.attributes)
                factor = int(trip.group(1)) if trip else 1
            callees = _CALLEES.findall(instruction.attributes)
            for branches in _BRANCHES.findall(instruction.attributes):
                callees += re.findall(r"%?([\w.\-]+)", branches)
            for callee in callees:
                calls[computation].append((callee, factor))
    order: list[str] = []
    seen: set[str] = set()

    def visit(computation: str) -> None:
        seen.add(computation)
        for callee, _ in calls[computation]:
            if callee not in seen:
                visit(callee)
        order.append(computation)

    visit(entry)
    executions = defaultdict(int, {entry: 1})
    # Reverse post-order: every caller is done before its callees.
    for computation in reversed(order):
        for callee, factor in calls[computation]:
            executions[callee] += executions[computation] * factor
    return dict(executions)


def _as_collective(
    instruction: _Instruction, by_name: dict[str, _Instruction], executions: int
) -> Collective | None:
    opcode = instruction.opcode
    if opcode in KINDS:
        kind, start, result = opcode, instruction, instruction
    elif opcode.endswith("-done") and opcode.removesuffix("-done") in _ASYNC_KINDS:
        start = by_name.get(instruction.operands[0]) if instruction.operands else None
        if start is None:
            raise ValueError(f"{opcode} {instruction.name} has no matching -start instruction")
        kind, result = opcode.removesuffix("-done"), instruction
    else:
        return None
    arrays = [
        (dtype, tuple(int(size) for size in dims.split(",") if size))
        for dtype, dims in _ARRAY.findall(result.shape_text)
    ]
    groups = _GROUPS.search(start.attributes)
    op_name = _OP_NAME.search(start.attributes)
    return Collective(
        kind=kind,
        name=start.name,
        shapes=tuple(shape for _, shape in arrays),
        dtypes=tuple(dtype for dtype, _ in arrays),
        executions=executions,
        bytes=executions * sum(_array_bytes(dtype, shape) for dtype, shape in arrays),
        replica_groups=groups.group(2).rstrip(",") if groups else "",
        op_name=op_name.group(1) if op_name else "",
    )


def _array_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of an array of an HLO element type ("bf16" 2 per element, "pred" 1, "s4" a half,
    rounded up)."""
    if dtype == "pred":
        return math.prod(shape)
    bits = re.search(r"\d+", dtype)
    if bits is None:
        raise ValueError(f"HLO element type {dtype!r} has no bit width")
    return -(-math.prod(shape) * int(bits.group()) // 8)
