"""Register-map profiles (drivers/profiles/<name>.yaml) and the Modbus codec built on them.

A profile places every point of a device kind (siteconfig.points) in a Modbus table with a
type and a scale, declares a read-only diagnostics header, and one holding-register block
per command. The simulator's endpoints serve it and the gateway's driver polls it, so both
sides share this one codec: a new device model is a new YAML file, not new code.

Conventions (documented in each profile as well):
- addresses are 0-based PDU offsets, as on the wire (mbpoll's -r is 1-based: address + 1);
- engineering value = raw * scale; 32-bit values span two registers in `word_order`;
- a command executes when one write covers exactly its block (see micro_ats_v1.yaml).

This module knows nothing of OPC UA or of the simulator.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache
from pathlib import Path

from siteconfig.model import AtsState, CmcsMode, SourceSelection, StorageMode
from siteconfig.points import COMMANDS, POINTS
from siteconfig.yamlpos import (
    ConfigError,
    ConfigErrors,
    ErrorCollector,
    MapReader,
    did_you_mean,
    read_document,
    read_file_text,
)

__all__ = [
    "BIT_TABLES",
    "DIAGNOSTICS",
    "ENUMS",
    "EXECUTE",
    "MAX_READ_BITS",
    "MAX_READ_REGISTERS",
    "MAX_WRITE_REGISTERS",
    "PROFILES_DIR",
    "REGISTER_TABLES",
    "CommandArg",
    "CommandMap",
    "CommandResult",
    "CommandReturn",
    "PointMap",
    "Profile",
    "ReadBlock",
    "available_profiles",
    "decode_block",
    "decode_command",
    "decode_point",
    "encode_command",
    "encode_point",
    "load_profile",
    "parse_profile",
    "read_blocks",
]

PROFILES_DIR = Path(__file__).resolve().parent.parent / "drivers" / "profiles"

# Modbus Application Protocol v1.1b3, 6.3/6.4 (FC3/FC4 quantity 1..125), 6.12 (FC16 1..123),
# 6.1/6.2 (FC1/FC2 quantity 1..2000).
MAX_READ_REGISTERS = 125
MAX_WRITE_REGISTERS = 123
MAX_READ_BITS = 2000
MODBUS_ADDRESS_SPACE = 65536  # 16-bit PDU addresses

REGISTER_TABLES = ("input", "holding")
BIT_TABLES = ("discrete", "coil")
TABLES = REGISTER_TABLES + BIT_TABLES
WRITABLE_TABLES = ("holding", "coil")

# type -> (struct format, registers)
REGISTER_TYPES: dict[str, tuple[str, int]] = {
    "uint16": ("H", 1),
    "int16": ("h", 1),
    "uint32": ("I", 2),
    "int32": ("i", 2),
    "float32": ("f", 2),
}
BIT_TYPE = "bool"
ACCESS = ("r", "rw", "w")
WORD_ORDERS = ("big", "little")
DEVICE_KINDS = tuple(POINTS)

# A command with no argument is a one-register block that must be written with this value.
EXECUTE = 1


class CommandResult(IntEnum):
    """Diagnostics enumeration `CommandResult`: outcome of the last command written."""

    NONE = 0
    ACCEPTED = 1
    REFUSED = 2  # the device refused it (exception 0x04)
    INVALID_ARGUMENT = 3  # exception 0x03


ENUMS: dict[str, type[IntEnum]] = {
    "SourceSelection": SourceSelection,
    "AtsState": AtsState,
    "StorageMode": StorageMode,
    "CmcsMode": CmcsMode,
    "CommandResult": CommandResult,
}

# Diagnostics a profile may declare: name -> value kind (as in siteconfig.points).
DIAGNOSTICS: dict[str, str] = {
    "PlantTime": "float",  # s
    "Heartbeat": "int",
    "CommandCounter": "int",
    "LastCommand": "int",
    "LastCommandResult": "enum:CommandResult",
    "CommandReturn": "float",
}

Value = float | int | bool


# --------------------------------------------------------------------------------------------
# Typed profile
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointMap:
    """Where and how one value lives in the device's Modbus tables."""

    name: str
    table: str  # input | holding | coil | discrete
    address: int  # 0-based PDU address of the first register (or bit)
    type: str  # uint16 | int16 | uint32 | int32 | float32 | bool (bit tables)
    scale: float = 1.0  # engineering value = raw * scale
    units: str = ""
    access: str = "r"
    description: str = ""
    enum: str | None = None  # name in ENUMS
    kind: str = "float"  # float | int | bool | enum:<Name>, as in siteconfig.points
    word_order: str = "big"

    @property
    def size(self) -> int:
        """Registers (or bits) it occupies."""
        return 1 if self.type == BIT_TYPE else REGISTER_TYPES[self.type][1]

    @property
    def end(self) -> int:
        """First address after it."""
        return self.address + self.size

    @property
    def ndigits(self) -> int | None:
        """Decimals that the scale resolves (0.01 -> 2), to round away binary noise on decode."""
        if self.type in ("float32", BIT_TYPE):
            return None
        exponent = math.log10(self.scale)
        if abs(exponent - round(exponent)) > 1e-9:
            return None
        return max(0, -round(exponent))


@dataclass(frozen=True)
class CommandArg(PointMap):
    """One argument of a command: a point in the command's holding-register block."""

    minimum: float | None = None  # engineering units
    maximum: float | None = None


@dataclass(frozen=True)
class CommandReturn:
    """What the diagnostics register CommandReturn holds after the command was accepted."""

    name: str  # key in the plant's result dict, e.g. TransferTime
    units: str = ""


@dataclass(frozen=True)
class CommandMap:
    """A command's holding-register block: executed by one write covering exactly the block."""

    name: str
    code: int  # reported in the LastCommand diagnostic
    address: int
    args: tuple[CommandArg, ...] = ()
    returns: CommandReturn | None = None
    description: str = ""

    @property
    def size(self) -> int:
        """Registers of the block (1 for a command without argument: the Execute register)."""
        return sum(a.size for a in self.args) if self.args else 1

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True)
class ReadBlock:
    """One read request: `count` registers (or bits) of `table` from `address`."""

    table: str
    address: int
    count: int
    points: tuple[PointMap, ...]
    _codec: "_BlockCodec | None" = field(default=None, init=False, repr=False, compare=False, hash=False)

    def decode(self, registers: Sequence[int]) -> dict[str, Value]:
        """Every point of the block from the registers (or bits) one read returned.

        Same values as `decode_block`, with the block's layout compiled once (one struct
        unpack per read instead of one per point): this runs for every device every scan."""
        codec = self._codec
        if codec is None:
            codec = _BlockCodec(self)
            object.__setattr__(self, "_codec", codec)
        return codec.decode(self, registers)


@dataclass(frozen=True)
class Profile:
    """A device model's register map."""

    name: str
    path: str
    vendor: str
    model: str
    description: str
    device_kind: str  # source | pdb | ats | des
    word_order: str
    points: tuple[PointMap, ...]
    diagnostics: tuple[PointMap, ...] = ()
    commands: tuple[CommandMap, ...] = ()
    _by_name: dict[str, PointMap] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update({p.name: p for p in self.diagnostics + self.points})

    def point(self, name: str) -> PointMap:
        """A telemetry point or diagnostic by name; KeyError if the profile has none."""
        return self._by_name[name]

    def command(self, name: str) -> CommandMap:
        """A command by name; KeyError if the device has none."""
        for c in self.commands:
            if c.name == name:
                return c
        raise KeyError(name)

    def command_at(self, address: int) -> CommandMap | None:
        """The command whose block starts at this holding address, if any."""
        for c in self.commands:
            if c.address == address:
                return c
        return None

    def maps(self, table: str, *, diagnostics: bool = True) -> list[PointMap]:
        """Points (and diagnostics) of one table, by address."""
        chosen = (self.diagnostics if diagnostics else ()) + self.points
        return sorted((p for p in chosen if p.table == table), key=lambda p: p.address)

    def tables(self) -> list[str]:
        """Tables the profile uses, holding included when it has commands."""
        used = {p.table for p in self.points + self.diagnostics}
        if self.commands:
            used.add("holding")
        return [t for t in TABLES if t in used]


# --------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------


def _int_range(fmt: str) -> tuple[int, int]:
    bits = 8 * struct.calcsize(fmt)
    return (0, 2**bits - 1) if fmt.isupper() else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _words(raw_bytes: bytes, word_order: str) -> list[int]:
    words = [int.from_bytes(raw_bytes[i : i + 2], "big") for i in range(0, len(raw_bytes), 2)]
    return words[::-1] if word_order == "little" else words


def _check_enum(point: PointMap, raw: int) -> None:
    if point.enum is not None:
        members = ENUMS[point.enum]
        if raw not in members._value2member_map_:
            names = ", ".join(f"{m.value} {m.name}" for m in members)
            raise ValueError(f"{point.name}: {raw} is not a {point.enum} ({names})")


def encode_point(point: PointMap, value: Value, *, clamp: bool = False) -> list[int]:
    """Registers (or one bit as 0/1) holding `value` in engineering units.

    Out-of-range values raise ValueError, or saturate at the type's limits with clamp=True
    (what a device does; the simulator uses it).
    """
    if point.type == BIT_TYPE:
        return [1 if value else 0]
    fmt, _ = REGISTER_TYPES[point.type]
    if point.type == "float32":
        raw_float = float(value) / point.scale
        if clamp and math.isfinite(raw_float):
            raw_float = max(-3.4e38, min(3.4e38, raw_float))
        try:
            packed = struct.pack(">f", raw_float)
        except OverflowError:
            raise ValueError(f"{point.name}: {value} does not fit a float32") from None
        return _words(packed, point.word_order)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{point.name}: {value} cannot be encoded as {point.type}")
    raw = int(round(float(value) / point.scale))
    low, high = _int_range(fmt)
    if not low <= raw <= high:
        if not clamp:
            raise ValueError(f"{point.name}: {value} {point.units} is outside the {point.type} range "
                             f"at scale {point.scale:g} ({low * point.scale:g}..{high * point.scale:g})")
        raw = max(low, min(high, raw))
    elif not clamp:
        _check_enum(point, raw)
    return _words(struct.pack(f">{fmt}", raw), point.word_order)


def decode_point(point: PointMap, registers: Sequence[int]) -> Value:
    """The engineering value from the point's registers (or its one bit)."""
    if len(registers) != point.size:
        raise ValueError(f"{point.name}: needs {point.size} register(s), got {len(registers)}")
    if point.type == BIT_TYPE:
        return bool(registers[0])
    fmt, _ = REGISTER_TYPES[point.type]
    words = list(registers)[::-1] if point.word_order == "little" else list(registers)
    if any(not 0 <= w <= 0xFFFF for w in words):
        raise ValueError(f"{point.name}: register values must be 0..65535, got {list(registers)}")
    raw = struct.unpack(f">{fmt}", b"".join(w.to_bytes(2, "big") for w in words))[0]
    if point.kind == "bool":
        return bool(raw)
    if point.kind == "int" or point.kind.startswith("enum:"):
        return int(round(raw * point.scale))
    value = raw * point.scale
    return round(value, point.ndigits) if point.ndigits is not None else float(value)


def read_blocks(profile: Profile, table: str, max_registers: int = MAX_READ_REGISTERS, *,
                diagnostics: bool = True) -> list[ReadBlock]:
    """As few read requests as cover every point of `table`, each at most `max_registers` long.

    Only address-contiguous points share a request: a device may refuse a read that spans a
    gap. For bit tables `max_registers` counts bits.
    """
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {', '.join(TABLES)}")
    blocks: list[ReadBlock] = []
    current: list[PointMap] = []
    for point in profile.maps(table, diagnostics=diagnostics):
        if point.size > max_registers:
            raise ValueError(f"{profile.name}: {point.name} needs {point.size} registers > {max_registers}")
        if current and point.address == current[-1].end and point.end - current[0].address <= max_registers:
            current.append(point)
            continue
        if current:
            blocks.append(_block(table, current))
        current = [point]
    if current:
        blocks.append(_block(table, current))
    return blocks


def _block(table: str, points: list[PointMap]) -> ReadBlock:
    return ReadBlock(table, points[0].address, points[-1].end - points[0].address, tuple(points))


def decode_block(block: ReadBlock, registers: Sequence[int]) -> dict[str, Value]:
    """Every point of a read block from the registers (or bits) the read returned."""
    if len(registers) < block.count:
        raise ValueError(f"read of {block.count} at {block.table} {block.address} returned {len(registers)}")
    out: dict[str, Value] = {}
    for p in block.points:
        offset = p.address - block.address
        out[p.name] = decode_point(p, registers[offset : offset + p.size])
    return out


_AS_BOOL, _AS_INT, _AS_FLOAT, _AS_ROUNDED = range(4)


class _BlockCodec:
    """A read block's layout, compiled: one struct format for the whole span and, per point,
    how its raw number becomes the engineering value (exactly as `decode_point` does it)."""

    __slots__ = ("count", "bits", "names", "words", "fields", "_unpack")

    def __init__(self, block: ReadBlock) -> None:
        self.count = block.count
        self.bits = block.table in BIT_TABLES
        self.names = tuple(p.name for p in block.points)
        self.words = struct.Struct(f">{block.count}H")
        formats = []
        fields = []
        for p in block.points:
            offset = p.address - block.address
            if self.bits:
                fields.append((p.name, offset, _AS_BOOL, 1.0, None))
                continue
            fmt, size = REGISTER_TYPES[p.type]
            # a little-endian word order is read as swapped words: its own format, not the block's
            swap = p.word_order == "little" and size > 1
            nd = p.ndigits
            conv = (_AS_BOOL if p.kind == "bool" else _AS_INT if p.kind == "int" or p.kind.startswith("enum:")
                    else _AS_FLOAT if nd is None else _AS_ROUNDED)
            fields.append((p.name, (offset, struct.Struct(f">{fmt}")) if swap else None, conv, p.scale, nd))
            formats.append((offset, fmt, size, swap))
        # the block is contiguous (read_blocks only joins adjacent points): one format covers it
        self.fields = tuple(fields)
        layout = "".join(f"{2 * size}x" if swap else fmt for _, fmt, size, swap in formats)
        self._unpack = struct.Struct(">" + layout).unpack if not self.bits else None

    def decode(self, block: ReadBlock, registers: Sequence[int]) -> dict[str, Value]:
        count = self.count
        if len(registers) < count:
            raise ValueError(f"read of {count} at {block.table} {block.address} returned {len(registers)}")
        if self.bits:
            return {name: bool(registers[offset]) for name, offset, _, _, _ in self.fields}
        try:
            raw_bytes = self.words.pack(*registers[:count])
        except struct.error:  # a register outside 0..65535: let the per-point decoder say which
            return decode_block(block, registers)
        raws = iter(self._unpack(raw_bytes))
        out: dict[str, Value] = {}
        for name, swapped, conv, scale, nd in self.fields:
            if swapped is None:
                raw = next(raws)
            else:
                offset, fmt = swapped
                b = 2 * offset
                raw = fmt.unpack(raw_bytes[b + 2:b + 4] + raw_bytes[b:b + 2])[0]
            if conv == _AS_FLOAT:
                out[name] = float(raw * scale)
            elif conv == _AS_ROUNDED:
                out[name] = round(raw * scale, nd)
            elif conv == _AS_INT:
                out[name] = int(round(raw * scale))
            else:
                out[name] = bool(raw)
        return out


def _check_arg(arg: CommandArg, value: Value) -> None:
    if arg.minimum is not None and value < arg.minimum:
        raise ValueError(f"{arg.name}: {value} is below its minimum {arg.minimum:g} {arg.units}".rstrip())
    if arg.maximum is not None and value > arg.maximum:
        raise ValueError(f"{arg.name}: {value} is above its maximum {arg.maximum:g} {arg.units}".rstrip())


def encode_command(command: CommandMap, **args: Value) -> list[int]:
    """The registers of one write that executes `command` with these arguments."""
    expected = [a.name for a in command.args]
    if sorted(args) != sorted(expected):
        raise ValueError(f"{command.name} takes ({', '.join(expected)}), got ({', '.join(args)})")
    if not command.args:
        return [EXECUTE]
    registers: list[int] = []
    for arg in command.args:
        _check_arg(arg, args[arg.name])
        registers += encode_point(arg, args[arg.name])
    return registers


def decode_command(command: CommandMap, registers: Sequence[int]) -> dict[str, Value]:
    """The arguments of a write covering the command's block; ValueError if one is invalid."""
    if len(registers) != command.size:
        raise ValueError(f"{command.name}: its block is {command.size} register(s), got {len(registers)}")
    if not command.args:
        if registers[0] != EXECUTE:
            raise ValueError(f"{command.name}: write {EXECUTE} to execute it, got {registers[0]}")
        return {}
    out: dict[str, Value] = {}
    for arg in command.args:
        offset = arg.address - command.address
        value = decode_point(arg, registers[offset : offset + arg.size])
        if arg.enum is not None:
            _check_enum(arg, int(value))
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{arg.name}: {value} is not a number")
        _check_arg(arg, value)
        out[arg.name] = value
    return out


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------

_TOP_KEYS = ("name", "vendor", "model", "description", "device_kind", "word_order", "diagnostics",
             "points", "commands")
_POINT_KEYS = ("name", "table", "address", "type", "scale", "units", "access", "description", "enum")
_ARG_KEYS = ("name", "address", "type", "scale", "units", "description", "enum", "min", "max")
_COMMAND_KEYS = ("name", "code", "address", "description", "returns", "args")
_RETURN_KEYS = ("name", "units")


def available_profiles(profiles_dir: Path | None = None) -> list[str]:
    """Names of the profiles in the profiles folder."""
    return sorted(p.stem for p in (profiles_dir or PROFILES_DIR).glob("*.yaml"))


def load_profile(name: str, profiles_dir: Path | None = None) -> Profile:
    """The profile `name` (drivers/profiles/<name>.yaml), validated and cached.

    Raises ConfigErrors, one `FILE:LINE: KEY: MESSAGE` line per problem.
    """
    return _load_profile(name, (profiles_dir or PROFILES_DIR).resolve())


@lru_cache(maxsize=None)
def _load_profile(name: str, profiles_dir: Path) -> Profile:
    path = profiles_dir / f"{name}.yaml"
    if "/" in name or "\\" in name or not path.is_file():
        known = ", ".join(available_profiles(profiles_dir)) or "none"
        raise ConfigErrors([ConfigError(str(path), None, None, f"no register-map profile '{name}' (known: {known})")])
    try:
        text = read_file_text(path)
    except ConfigError as exc:
        raise ConfigErrors([exc]) from None
    return parse_profile(text, str(path), expected_name=name)


def parse_profile(text: str, filename: str = "<profile>", *, expected_name: str | None = None) -> Profile:
    """Validate profile text; raises ConfigErrors naming file, line and key of every problem."""
    errors = ErrorCollector(filename)
    top = read_document(text, errors, "a mapping with keys name, device_kind, points")
    profile = _ProfileReader(errors).read(top, expected_name) if top is not None else None
    errors.raise_if_any()
    assert profile is not None
    return profile


class _ProfileReader:
    """One pass over a profile file; records every problem in `errors`."""

    def __init__(self, errors: ErrorCollector):
        self.errors = errors
        self.word_order = "big"
        # table -> (start, end, what, key path, line) of everything placed in it, for the overlap check
        self.spans: dict[str, list[tuple[int, int, str, str, int]]] = {t: [] for t in TABLES}

    def read(self, top: MapReader, expected_name: str | None) -> Profile | None:
        top.reject_unknown(_TOP_KEYS)
        name = top.string("name", pattern=r"[A-Za-z0-9_.-]+")
        if name is not None and expected_name is not None and name != expected_name:
            top.error(f"must equal the file name '{expected_name}', got '{name}'", "name")
        kind = top.choice("device_kind", DEVICE_KINDS)
        self.word_order = top.choice("word_order", WORD_ORDERS, "big") or "big"
        diagnostics = [self._point(r, None) for r in top.mappings("diagnostics")]
        catalogue = {p.name: p for p in POINTS.get(kind, ())}
        points = [self._point(r, catalogue if kind else {}) for r in top.mappings("points", required=True)]
        commands = [self._command(r, kind) for r in top.mappings("commands")]
        self._check_unique(top, "diagnostics", diagnostics)
        self._check_unique(top, "points", points)
        if kind is not None:
            missing = sorted(set(catalogue) - {p.name for p in points if p is not None})
            if missing:
                top.error(f"{kind} points missing: {', '.join(missing)} (siteconfig/points.py)", "points")
            names = {c.name for c in commands if c is not None}
            expected = set(COMMANDS.get(kind, {}))
            if names != expected:
                extra, lacking = sorted(names - expected), sorted(expected - names)
                detail = "; ".join(s for s in (f"missing: {', '.join(lacking)}" if lacking else "",
                                               f"not a {kind} command: {', '.join(extra)}" if extra else "") if s)
                top.error(f"commands must be exactly those of siteconfig/points.py COMMANDS['{kind}'] ({detail})",
                          "commands")
        self._check_overlaps()
        codes = [c.code for c in commands if c is not None]
        if len(codes) != len(set(codes)):
            top.error("command codes must be unique", "commands")
        if self.errors.errors:
            return None
        return Profile(
            name=name, path=self.errors.filename,
            vendor=top.string("vendor"), model=top.string("model"),
            description=(top.string("description", "") or "").strip(),
            device_kind=kind, word_order=self.word_order,
            points=tuple(points), diagnostics=tuple(diagnostics), commands=tuple(commands),
        )

    def _check_unique(self, top: MapReader, key: str, items: Iterable[PointMap | None]) -> None:
        seen: set[str] = set()
        for p in items:
            if p is None:
                continue
            if p.name in seen:
                top.error(f"duplicate name '{p.name}'", key)
            seen.add(p.name)

    def _span(self, table: str, start: int, end: int, what: str, r: MapReader) -> None:
        self.spans[table].append((start, end, what, r.key_path("address"), r.line_of("address")))

    def _check_overlaps(self) -> None:
        for table, spans in self.spans.items():
            spans.sort(key=lambda span: (span[0], span[4]))
            for (s1, e1, what1, _, _), (s2, e2, what2, key2, line2) in zip(spans, spans[1:]):
                if s2 < e1:
                    self.errors.add(line2, key2, f"{what2} ({table} {s2}..{e2 - 1}) overlaps {what1} "
                                                 f"({table} {s1}..{e1 - 1})")

    def _register_fields(self, r: MapReader, table: str | None) -> dict | None:
        """address, type, scale and enum of a point or argument."""
        types = (BIT_TYPE,) if table in BIT_TABLES else tuple(REGISTER_TYPES)
        address = r.integer("address", ge=0, le=MODBUS_ADDRESS_SPACE - 1)
        type_ = r.choice("type", types)
        scale = r.number("scale", 1.0, gt=0)
        enum = r.choice("enum", list(ENUMS), None)
        if None in (address, type_, scale):
            return None
        size = 1 if type_ == BIT_TYPE else REGISTER_TYPES[type_][1]
        if address + size > MODBUS_ADDRESS_SPACE:
            r.error(f"{type_} at {address} runs past the last address {MODBUS_ADDRESS_SPACE - 1}", "address")
        return {"address": address, "type": type_, "scale": scale, "enum": enum, "size": size}

    @staticmethod
    def _check_kind(r: MapReader, kind: str, fields: dict) -> None:
        """The register encoding must be able to carry the value kind of the catalogue."""
        enum, type_, scale = fields["enum"], fields["type"], fields["scale"]
        base = kind.split(":")[0]
        if kind.startswith("enum:") and enum != kind[5:]:
            r.error(f"must be '{kind[5:]}' (the point is a {kind[5:]})", "enum")
        if not kind.startswith("enum:") and enum is not None:
            r.error(f"the point is a {kind}, not an enumeration", "enum")
        if kind == "bool" and type_ not in (BIT_TYPE, "uint16"):
            r.error("a boolean is a bit (discrete/coil) or a uint16 0/1", "type")
        if kind != "bool" and type_ == BIT_TYPE:
            r.error(f"a {base} value needs a register table", "table")
        if kind != "float" and scale != 1.0:
            r.error(f"a {base} value needs scale 1", "scale")
        if kind != "float" and type_ == "float32":
            r.error(f"a {base} value needs an integer type", "type")

    @staticmethod
    def _units(r: MapReader) -> str:
        """The units string; empty (\"\") for dimensionless values."""
        value = r.get("units", "")
        if isinstance(value, str):
            return value
        if getattr(value.node, "value", None) == "":
            return ""
        return value.as_str() or ""

    def _point(self, r: MapReader, catalogue: Mapping | None) -> PointMap | None:
        """A point (catalogue given) or a diagnostic (catalogue None)."""
        r.reject_unknown(_POINT_KEYS)
        name = r.string("name")
        spec = None
        if name is not None:
            if catalogue is None:
                if name not in DIAGNOSTICS:
                    r.error(f"unknown diagnostic{did_you_mean(name, DIAGNOSTICS)}; known: {', '.join(DIAGNOSTICS)}",
                            "name")
            elif catalogue:
                spec = catalogue.get(name)
                if spec is None:
                    r.error(f"not a point of this device kind{did_you_mean(name, catalogue)}; "
                            f"known: {', '.join(catalogue)}", "name")
        kind = DIAGNOSTICS.get(name) if catalogue is None else (spec.kind if spec else None)
        table = r.choice("table", TABLES)
        fields = self._register_fields(r, table)
        if fields is not None and kind is not None:
            self._check_kind(r, kind, fields)
        units = self._units(r)
        if spec is not None and (units or "") != spec.units:
            r.error(f"must be '{spec.units}' as in siteconfig/points.py, got '{units}'", "units")
        access = r.choice("access", ACCESS, "r")
        if catalogue is None and access != "r":
            r.error("diagnostics are read-only: access r", "access")
        if table is not None and access is not None and table not in WRITABLE_TABLES and access != "r":
            r.error(f"the {table} table is read-only: access r", "access")
        description = r.string("description", spec.description if spec else "")
        if name is None or table is None or fields is None or access is None or kind is None:
            return None
        self._span(table, fields["address"], fields["address"] + fields["size"], name, r)
        return PointMap(name=name, table=table, address=fields["address"], type=fields["type"],
                        scale=fields["scale"], units=units or "", access=access, description=description or "",
                        enum=fields["enum"], kind=kind, word_order=self.word_order)

    def _command(self, r: MapReader, kind: str | None) -> CommandMap | None:
        r.reject_unknown(_COMMAND_KEYS)
        name = r.string("name")
        code = r.integer("code", ge=1, le=0xFFFF)
        address = r.integer("address", ge=0, le=MODBUS_ADDRESS_SPACE - 1)
        description = r.string("description", "")
        returns = None
        ret = r.mapping("returns")
        if ret is not None:
            ret.reject_unknown(_RETURN_KEYS)
            ret_name, ret_units = ret.string("name"), ret.string("units", "")
            returns = CommandReturn(ret_name, ret_units or "") if ret_name else None
        arg_names = COMMANDS.get(kind or "", {}).get(name or "")
        args: list[CommandArg] = []
        for a in r.mappings("args"):
            arg = self._arg(a)
            if arg is not None:
                args.append(arg)
        if name is None or code is None or address is None:
            return None
        if arg_names is not None and [a.name for a in args] != list(arg_names):
            r.error(f"must be ({', '.join(arg_names)}) in this order, as in siteconfig/points.py", "args")
        next_address = address
        for arg in args:
            if arg.address != next_address:
                r.error(f"argument {arg.name} must start at {next_address}: a block is contiguous from "
                        f"the command address", "args")
                break
            next_address = arg.end
        command = CommandMap(name=name, code=code, address=address, args=tuple(args), returns=returns,
                             description=description or "")
        if command.size > MAX_WRITE_REGISTERS:
            r.error(f"block of {command.size} registers cannot be written in one FC16 write "
                    f"(max {MAX_WRITE_REGISTERS})", "args")
        self._span("holding", command.address, command.end, f"command {name}", r)
        return command

    def _arg(self, r: MapReader) -> CommandArg | None:
        r.reject_unknown(_ARG_KEYS)
        name = r.string("name")
        fields = self._register_fields(r, "holding")
        enum = fields["enum"] if fields else None
        if fields is not None:
            self._check_kind(r, f"enum:{enum}" if enum else "float", fields)
        units = self._units(r)
        minimum, maximum = r.number("min", None), r.number("max", None)
        description = r.string("description", "")
        if name is None or fields is None:
            return None
        return CommandArg(name=name, table="holding", address=fields["address"], type=fields["type"],
                          scale=fields["scale"], units=units or "", access="rw", description=description or "",
                          enum=enum, kind=f"enum:{enum}" if enum else "float", word_order=self.word_order,
                          minimum=minimum, maximum=maximum)
