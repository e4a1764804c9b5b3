"""Build a site's instance tree from the PowerDistribution types, in bulk.

asyncua's `instantiate()` issues several awaited service calls per node (about 10 s per
1,000 objects); a 1,000-unit site has ~80k nodes. Here each ObjectType is read once from the
address space into a template, and instances are written straight into the address space
(`AddressSpace._nodes`) as `NodeData` with the same attributes and references asyncua's own
`NodeManagementService._add_node` would create. Immutable attribute DataValues and identical
ReferenceDescriptions are shared between instances (asyncua replaces, never mutates, them);
each node's AttributeValues are created on first access (`_LazyAttributes`). A 1,000-unit
site builds in about 1.3 s and 65 MB here.

Layout (docs/interface.md section 3), namespace `urn:cmcs-gateway:site:<site.name>`:
    Objects/<Site>/Sources/{SourceA,SourceB}
    Objects/<Site>/Aisles/AisleNN/{PDB-NN-A, PDB-NN-B, MATS-NN-MM[/Storage]}
    Objects/<Site>/Cmcs
A reload (gateway/reload.py) adds aisles and units with `extend_site` (the same builder, so the
same nodes as at start) and deletes them with `shrink_site`.

Instance NodeIds are strings: the device name ("MATS-01-02"), "<device>.<member>" for its
variables and methods, "<device>.<member>.<property>" below those; "Site", "Sources",
"Aisles", the aisle name and "Cmcs" for the rest. A DES unit's object id is its own device
name although its BrowseName is `Storage`.
"""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.server.address_space import AddressSpace, AttributeValue, NodeData

from information_model import fastpath, spec
from siteconfig import model as site_model
from siteconfig.model import MicroAtsConfig, PdbConfig, Site, SourceConfig, StorageConfig

NODESET_PATH = Path(__file__).with_name("cmcs_power.NodeSet2.xml")
SITE_NAMESPACE_PREFIX = "urn:cmcs-gateway:site:"

_A = ua.AttributeIds
_HAS_COMPONENT = ua.NodeId(ua.ObjectIds.HasComponent)
_HAS_PROPERTY = ua.NodeId(ua.ObjectIds.HasProperty)
_HAS_TYPEDEF = ua.NodeId(ua.ObjectIds.HasTypeDefinition)
_HAS_SUBTYPE = ua.NodeId(ua.ObjectIds.HasSubtype)
_HAS_MODELLING_RULE = ua.NodeId(ua.ObjectIds.HasModellingRule)
_ORGANIZES = ua.NodeId(ua.ObjectIds.Organizes)
_FOLDER_TYPE = ua.NodeId(ua.ObjectIds.FolderType)
_PROPERTY_TYPE = ua.NodeId(ua.ObjectIds.PropertyType)
_OPTIONAL_RULES = (
    ua.NodeId(ua.ObjectIds.ModellingRule_Optional),
    ua.NodeId(ua.ObjectIds.ModellingRule_OptionalPlaceholder),
)
_NULL_NODEID = ua.NodeId()
_OBJECTS_FOLDER = ua.NodeId(ua.ObjectIds.ObjectsFolder)

_WAITING = ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData)
_BUILTIN_VARIANT = {  # ns=0 DataType id -> VariantType
    1: ua.VariantType.Boolean,
    7: ua.VariantType.UInt32,
    11: ua.VariantType.Double,
    12: ua.VariantType.String,
}
_INTEGER_VARIANTS = {
    ua.VariantType.SByte, ua.VariantType.Byte, ua.VariantType.Int16, ua.VariantType.UInt16,
    ua.VariantType.Int32, ua.VariantType.UInt32, ua.VariantType.Int64, ua.VariantType.UInt64,
}  # fmt: skip
_FLOAT_VARIANTS = {ua.VariantType.Float, ua.VariantType.Double}


def _dv(value: Any, vtype: ua.VariantType, is_array: bool = False) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value, vtype, is_array=is_array))


class _LazyAttributes(dict):
    """`NodeData.attributes` of a node made from an InstanceDeclaration.

    asyncua keeps one mutable `AttributeValue` (value + callbacks) per attribute per node; a
    1,000-unit site would need 1.2 M of them (~250 MB, 1.5 s) though almost all are never
    touched. Here each is created from the declaration's shared, never-mutated DataValue on
    first access, so every node still owns its AttributeValues and asyncua's code paths
    (`get`, `[]`, `in`, iteration) behave as with a plain dict.
    """

    __slots__ = ("_template", "_nodeid")

    def __init__(self, nodeid: ua.NodeId, template: Mapping[ua.AttributeIds, ua.DataValue]) -> None:
        super().__init__()
        self._template = template
        self._nodeid = nodeid

    def __missing__(self, aid: ua.AttributeIds) -> AttributeValue:
        if aid == ua.AttributeIds.NodeId:
            dv = ua.DataValue(ua.Variant(self._nodeid, ua.VariantType.NodeId))
        else:
            dv = self._template[aid]  # KeyError, as a plain dict, for attributes the node lacks
        av = AttributeValue(dv)
        dict.__setitem__(self, aid, av)
        return av

    def get(self, aid: Any, default: Any = None) -> Any:
        try:
            return self[aid]
        except KeyError:
            return default

    def __contains__(self, aid: object) -> bool:
        return dict.__contains__(self, aid) or aid == ua.AttributeIds.NodeId or aid in self._template

    def _materialise(self) -> None:
        for aid in (ua.AttributeIds.NodeId, *self._template):
            if not dict.__contains__(self, aid):
                self.__missing__(aid)

    def __iter__(self):  # type: ignore[no-untyped-def]
        self._materialise()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._materialise()
        return dict.__len__(self)

    def keys(self):  # type: ignore[no-untyped-def]
        self._materialise()
        return dict.keys(self)

    def values(self):  # type: ignore[no-untyped-def]
        self._materialise()
        return dict.values(self)

    def items(self):  # type: ignore[no-untyped-def]
        self._materialise()
        return dict.items(self)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # AddressSpace.dump pickles nodes: store a plain dict
        self._materialise()
        return (dict, (dict(dict.items(self)),))


# --------------------------------------------------------------------------------------
# Loading the types
# --------------------------------------------------------------------------------------


async def load_information_model(server: Server, path: str | Path = NODESET_PATH) -> int:
    """Import the types NodeSet (once) and return its namespace index."""
    uris = await server.get_namespace_array()
    if spec.TYPES_NAMESPACE_URI not in uris:
        await server.import_xml(str(path))
        await server.load_data_type_definitions()
    return await server.get_namespace_index(spec.TYPES_NAMESPACE_URI)


# --------------------------------------------------------------------------------------
# Templates: an ObjectType's InstanceDeclarations, read once from the address space
# --------------------------------------------------------------------------------------


@dataclass
class _Decl:
    browse_name: ua.QualifiedName
    node_class: ua.NodeClass
    reftype: ua.NodeId  # reference from the parent
    typedef: ua.NodeId  # null for methods
    # Attributes every instance starts with (incl. NodeClass, BrowseName and, for Properties,
    # the declared Value); shared DataValues, see _LazyAttributes.
    template: dict[ua.AttributeIds, ua.DataValue]
    optional: bool
    children: list[_Decl] = field(default_factory=list)
    variant_type: ua.VariantType | None = None  # builtin type of the value (enums: Int32)
    datatype_name: str | None = None  # enumeration name
    historized: bool = False

    @property
    def name(self) -> str:
        return self.browse_name.Name

    @property
    def display_name(self) -> ua.LocalizedText:
        return self.template[ua.AttributeIds.DisplayName].Value.Value  # type: ignore[union-attr]


def _attr(nd: NodeData, aid: ua.AttributeIds) -> ua.DataValue | None:
    av = nd.attributes.get(aid)
    return None if av is None else av.value


def _first_target(nd: NodeData, reftype: ua.NodeId) -> ua.NodeId | None:
    for r in nd.references:
        if r.IsForward and r.ReferenceTypeId == reftype:
            return r.NodeId
    return None


class _Types:
    """Templates of the loaded ObjectTypes plus what the builder needs about DataTypes."""

    def __init__(self, aspace: AddressSpace, types_idx: int) -> None:
        self.aspace = aspace
        self.idx = types_idx
        self.enum_names: dict[ua.NodeId, str] = {}
        for e in spec.ENUMERATIONS:
            self.enum_names[ua.NodeId(e.block, types_idx)] = e.name
        self.type_ids = {t.name: ua.NodeId(t.block, types_idx) for t in spec.OBJECT_TYPES}
        self._templates: dict[ua.NodeId, list[_Decl]] = {}

    def variant_type(self, datatype: ua.NodeId) -> tuple[ua.VariantType | None, str | None]:
        if datatype in self.enum_names:
            return ua.VariantType.Int32, self.enum_names[datatype]
        if datatype.NamespaceIndex == 0 and datatype.Identifier in _BUILTIN_VARIANT:
            return _BUILTIN_VARIANT[datatype.Identifier], None
        if datatype.NamespaceIndex == 0 and isinstance(datatype.Identifier, int) and datatype.Identifier <= 25:
            return ua.VariantType(datatype.Identifier), None
        return None, None

    def template(self, type_id: ua.NodeId) -> list[_Decl]:
        """InstanceDeclarations of a type and its supertypes (nearest wins by BrowseName)."""
        if type_id not in self._templates:
            decls: dict[str, _Decl] = {}
            for tid in self._supertypes(type_id):
                for d in self._children(tid):
                    decls.setdefault(d.name, d)
            self._templates[type_id] = list(decls.values())
        return self._templates[type_id]

    def _supertypes(self, type_id: ua.NodeId) -> list[ua.NodeId]:
        chain = []
        tid: ua.NodeId | None = type_id
        while tid is not None and tid.NamespaceIndex != 0:  # ns=0 base types declare nothing we instantiate
            chain.append(tid)
            refs = self.aspace[tid].references
            tid = next((r.NodeId for r in refs if not r.IsForward and r.ReferenceTypeId == _HAS_SUBTYPE), None)
        return chain

    def _children(self, parent: ua.NodeId) -> list[_Decl]:
        out = []
        for r in self.aspace[parent].references:
            if not r.IsForward or r.ReferenceTypeId not in (_HAS_COMPONENT, _HAS_PROPERTY):
                continue
            nd = self.aspace[r.NodeId]
            rule = _first_target(nd, _HAS_MODELLING_RULE)
            if rule is None:  # Part 3 6.4.4.4: not an InstanceDeclaration
                continue
            out.append(self._decl(nd, r.ReferenceTypeId, rule in _OPTIONAL_RULES))
        return out

    def _decl(self, nd: NodeData, reftype: ua.NodeId, optional: bool) -> _Decl:
        node_class = ua.NodeClass(_attr(nd, _A.NodeClass).Value.Value)  # type: ignore[union-attr]
        bname = _attr(nd, _A.BrowseName).Value.Value  # type: ignore[union-attr]
        template = {aid: av.value for aid, av in nd.attributes.items() if aid != _A.NodeId and av.value is not None}
        decl = _Decl(
            browse_name=bname,
            node_class=node_class,
            reftype=reftype,
            typedef=_first_target(nd, _HAS_TYPEDEF) or _NULL_NODEID,
            template=template,
            optional=optional,
        )
        if node_class == ua.NodeClass.Variable:
            datatype = template[_A.DataType].Value.Value  # type: ignore[union-attr]
            decl.variant_type, decl.datatype_name = self.variant_type(datatype)
            access = template.get(_A.AccessLevel)
            level = access.Value.Value if access is not None else 1  # type: ignore[union-attr]
            decl.historized = bool(level & ua.AccessLevel.HistoryRead.mask)
            # The importer leaves UserAccessLevel at CurrentRead and drops Historizing: derive both.
            template[_A.UserAccessLevel] = _dv(level, ua.VariantType.Byte)
            template[_A.Historizing] = _dv(decl.historized, ua.VariantType.Boolean)
            if decl.typedef != _PROPERTY_TYPE:
                # data variable: no value until the first poll (Part 4 7.34 BadWaitingForInitialData)
                template[_A.Value] = ua.DataValue(ua.Variant(), StatusCode=_WAITING)
            elif _A.Value not in template:
                template[_A.Value] = ua.DataValue(ua.Variant())
        elif node_class == ua.NodeClass.Method:
            template[_A.Executable] = _dv(True, ua.VariantType.Boolean)
            template[_A.UserExecutable] = _dv(True, ua.VariantType.Boolean)
        decl.children = self._children(nd.nodeid)
        return decl


# --------------------------------------------------------------------------------------
# The result handed to the rest of the gateway
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodInfo:
    """One method of one instance."""

    device: str
    object_id: ua.NodeId
    method: str  # BrowseName, e.g. "SwitchSource"
    method_id: ua.NodeId
    inputs: tuple[_ArgSpec, ...]
    outputs: tuple[_ArgSpec, ...]


@dataclass(frozen=True)
class _ArgSpec:
    name: str
    variant_type: ua.VariantType
    enum: type | None  # siteconfig IntEnum for enumeration arguments
    enum_values: frozenset[int] | None


@dataclass
class SiteModel:
    """What the builder made: the handles the point table, command service and historian need."""

    namespace_uri: str
    ns_index: int  # instance namespace
    types_ns_index: int
    site_node: ua.NodeId
    points: dict[tuple[str, str], ua.NodeId]  # (device name, point BrowseName) -> variable
    point_types: dict[ua.NodeId, ua.VariantType]  # variable -> VariantType its values must have
    device_nodes: dict[str, ua.NodeId]  # device name -> object ("Cmcs" for the CMCS object)
    devices: dict[ua.NodeId, str]  # object -> device name (every method-bearing object is here)
    device_kinds: dict[str, str]  # device name -> source|pdb|ats|des|cmcs
    methods: dict[tuple[str, str], MethodInfo]  # (device name, method BrowseName) -> method
    historized: list[ua.NodeId]  # variables whose AccessLevel has HistoryRead
    type_ids: dict[str, ua.NodeId]  # ObjectType / enumeration name -> NodeId
    node_count: int = 0
    # (device, point) -> (NodeId, VariantType, its Value AttributeValue), filled on first write by
    # information_model.fastpath: spares two NodeId hashes (a Python-level __hash__) per value
    value_slots: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def variable_count(self) -> int:
        return len(self.points)


# --------------------------------------------------------------------------------------
# The bulk builder
# --------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, aspace: AddressSpace, types: _Types, ns: int) -> None:
        self.aspace = aspace
        self.nodes = aspace._nodes  # the dict AddressSpace wraps; one dict op per node
        self.types = types
        self.ns = ns
        self.count = 0
        self._now = datetime.now(timezone.utc)
        self._nodeclass_dv = {nc: _dv(int(nc), ua.VariantType.Int32) for nc in ua.NodeClass}
        self._typedef_refs: dict[ua.NodeId, ua.ReferenceDescription] = {}
        self._inverse_refs: dict[tuple[ua.NodeId, ua.NodeId], ua.ReferenceDescription] = {}
        self._zero = _dv(0, ua.VariantType.UInt32)
        self.points: dict[tuple[str, str], ua.NodeId] = {}
        self.point_types: dict[ua.NodeId, ua.VariantType] = {}
        self.historized: list[ua.NodeId] = []
        self.methods: dict[tuple[str, str], MethodInfo] = {}

    # -- primitives ----------------------------------------------------------------------
    def config_value(self, value: Any, vtype: ua.VariantType) -> ua.DataValue:
        """Initial Value of a variable the site file already knows (ratings, positions)."""
        return ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=self._now, ServerTimestamp=self._now)

    def _typedef_ref(self, typedef: ua.NodeId) -> ua.ReferenceDescription:
        # One shared object per type: identical content, and asyncua only ever replaces or
        # renames (consistently for all holders) a ReferenceDescription.
        rd = self._typedef_refs.get(typedef)
        if rd is None:
            tnd = self.nodes[typedef]
            rd = self._typedef_refs[typedef] = ua.ReferenceDescription(
                ReferenceTypeId=_HAS_TYPEDEF,
                IsForward=True,
                NodeId=typedef,
                BrowseName=_attr(tnd, _A.BrowseName).Value.Value,  # type: ignore[union-attr]
                DisplayName=_attr(tnd, _A.DisplayName).Value.Value,  # type: ignore[union-attr]
                NodeClass=ua.NodeClass(_attr(tnd, _A.NodeClass).Value.Value),  # type: ignore[union-attr]
                TypeDefinition=_NULL_NODEID,
            )
        return rd

    def _inverse_ref(self, parent: NodeData, reftype: ua.NodeId) -> ua.ReferenceDescription:
        key = (parent.nodeid, reftype)
        rd = self._inverse_refs.get(key)
        if rd is None:
            pa = parent.attributes
            rd = self._inverse_refs[key] = ua.ReferenceDescription(
                ReferenceTypeId=reftype,
                IsForward=False,
                NodeId=parent.nodeid,
                BrowseName=pa[_A.BrowseName].value.Value.Value,  # type: ignore[union-attr]
                DisplayName=pa[_A.DisplayName].value.Value.Value,  # type: ignore[union-attr]
                NodeClass=ua.NodeClass(pa[_A.NodeClass].value.Value.Value),  # type: ignore[union-attr]
                TypeDefinition=_first_target(parent, _HAS_TYPEDEF) or _NULL_NODEID,
            )
        return rd

    def _link(
        self,
        nd: NodeData,
        node_class: ua.NodeClass,
        bname: ua.QualifiedName,
        dname: ua.LocalizedText,
        parent: NodeData,
        reftype: ua.NodeId,
        typedef: ua.NodeId,
        inverse: ua.ReferenceDescription | None = None,
    ) -> NodeData:
        """Insert a node with its references to parent and type, as `_add_node` would."""
        nodeid = nd.nodeid
        if nodeid in self.nodes:
            raise ValueError(f"NodeId {nodeid.to_string()} already exists")
        refs = nd.references
        refs.append(inverse or self._inverse_ref(parent, reftype))
        if not typedef.is_null():
            refs.append(self._typedef_ref(typedef))
        parent.references.append(
            ua.ReferenceDescription(
                ReferenceTypeId=reftype,
                IsForward=True,
                NodeId=nodeid,
                BrowseName=bname,
                DisplayName=dname,
                NodeClass=node_class,
                TypeDefinition=typedef,
            )
        )
        self.nodes[nodeid] = nd
        self.count += 1
        return nd

    def _from_decl(
        self,
        decl: _Decl,
        sid: str,
        parent: NodeData,
        value: ua.DataValue | None = None,
        inverse: ua.ReferenceDescription | None = None,
    ) -> NodeData:
        nodeid = ua.NodeId(sid, self.ns)  # NodeIdType String, inferred: an explicit one is re-checked per node
        nd = NodeData(nodeid)
        nd.attributes = attrs = _LazyAttributes(nodeid, decl.template)
        if value is not None:
            dict.__setitem__(attrs, _A.Value, AttributeValue(value))
        return self._link(
            nd, decl.node_class, decl.browse_name, decl.display_name, parent, decl.reftype, decl.typedef, inverse
        )

    @staticmethod
    def _inverse_to(nd: NodeData, decl: _Decl, reftype: ua.NodeId) -> ua.ReferenceDescription:
        """Inverse reference from a child to `nd`, made from `nd`'s declaration (no attribute reads)."""
        return ua.ReferenceDescription(
            ReferenceTypeId=reftype,
            IsForward=False,
            NodeId=nd.nodeid,
            BrowseName=decl.browse_name,
            DisplayName=decl.display_name,
            NodeClass=decl.node_class,
            TypeDefinition=decl.typedef,
        )

    def object(
        self,
        sid: str,
        bname: ua.QualifiedName,
        display: str,
        description: str,
        parent: NodeData,
        reftype: ua.NodeId,
        typedef: ua.NodeId,
        event_notifier: int = 0,
    ) -> NodeData:
        nodeid = ua.NodeId(sid, self.ns)  # NodeIdType String, inferred: an explicit one is re-checked per node
        dname = ua.LocalizedText(display)
        nd = NodeData(nodeid)
        for aid, dv in (
            (_A.NodeId, _dv(nodeid, ua.VariantType.NodeId)),
            (_A.NodeClass, self._nodeclass_dv[ua.NodeClass.Object]),
            (_A.BrowseName, _dv(bname, ua.VariantType.QualifiedName)),
            (_A.DisplayName, _dv(dname, ua.VariantType.LocalizedText)),
            (_A.Description, _dv(ua.LocalizedText(description, "en"), ua.VariantType.LocalizedText)),
            (_A.WriteMask, self._zero),
            (_A.UserWriteMask, self._zero),
            (_A.EventNotifier, _dv(event_notifier, ua.VariantType.Byte)),
        ):
            nd.attributes[aid] = AttributeValue(dv)
        return self._link(nd, ua.NodeClass.Object, bname, dname, parent, reftype, typedef)

    # -- instances of ObjectTypes --------------------------------------------------------
    def instance(
        self,
        type_name: str,
        device: str,
        bname: ua.QualifiedName,
        description: str,
        parent: NodeData,
        reftype: ua.NodeId,
        values: Mapping[str, ua.DataValue] | None = None,
        ranges: Mapping[str, tuple[float, float]] | None = None,
    ) -> NodeData:
        """One object of an ObjectType with its Mandatory members; Optional ones are left out."""
        type_id = self.types.type_ids[type_name]
        obj = self.object(device, bname, bname.Name, description, parent, reftype, type_id, event_notifier=1)
        values = values or {}
        ranges = ranges or {}
        for decl in self.types.template(type_id):
            if not decl.optional:
                self._member(decl, obj, device, values, ranges)
        return obj

    def _member(
        self,
        decl: _Decl,
        parent: NodeData,
        device: str,
        values: Mapping[str, ua.DataValue],
        ranges: Mapping[str, tuple[float, float]],
    ) -> None:
        name = decl.name
        sid = f"{device}.{name}"
        if decl.node_class == ua.NodeClass.Variable:
            nd = self._from_decl(decl, sid, parent, values.get(name))
            self.points[(device, name)] = nd.nodeid
            self.point_types[nd.nodeid] = decl.variant_type  # type: ignore[assignment]
            if decl.historized:
                self.historized.append(nd.nodeid)
            inverse = self._inverse_to(nd, decl, _HAS_PROPERTY) if decl.children else None
            for prop in decl.children:
                pvalue = None
                if prop.name == "EURange" and name in ranges:
                    lo, hi = ranges[name]
                    pvalue = _dv(ua.Range(float(lo), float(hi)), ua.VariantType.ExtensionObject)
                self._from_decl(prop, f"{sid}.{prop.name}", nd, pvalue, inverse)
        elif decl.node_class == ua.NodeClass.Method:
            nd = self._from_decl(decl, sid, parent)
            args: dict[str, tuple[_ArgSpec, ...]] = {}
            inverse = self._inverse_to(nd, decl, _HAS_PROPERTY) if decl.children else None
            for prop in decl.children:
                self._from_decl(prop, f"{sid}.{prop.name}", nd, inverse=inverse)
                args[prop.name] = self._arg_specs(prop.template[_A.Value])
            self.methods[(device, name)] = MethodInfo(
                device, parent.nodeid, name, nd.nodeid, args.get("InputArguments", ()), args.get("OutputArguments", ())
            )
        else:  # a Mandatory object component: not in the current model
            raise NotImplementedError(f"{name}: {decl.node_class.name} InstanceDeclarations are not supported")

    def _arg_specs(self, dv: ua.DataValue) -> tuple[_ArgSpec, ...]:
        out = []
        for arg in (dv.Value.Value if dv.Value is not None else None) or []:
            vtype, enum_name = self.types.variant_type(arg.DataType)
            enum_cls = getattr(site_model, enum_name) if enum_name else None
            values = frozenset(int(v) for v in enum_cls) if enum_cls is not None else None
            out.append(_ArgSpec(arg.Name, vtype or ua.VariantType.Variant, enum_cls, values))
        return tuple(out)


# -- per-device engineering ranges and configured values ---------------------------------

_HEADROOM = 1.25  # EURange high = 125 % of rating: room for overloads without clipping trends


def _three_phase_kw(voltage_ll_v: float, current_a: float) -> float:
    return math.sqrt(3) * voltage_ll_v * current_a / 1000.0


def _source_ranges(src: SourceConfig) -> dict[str, tuple[float, float]]:
    p = src.rated_power_kw * _HEADROOM
    return {
        "Voltage": (0.0, src.nominal_voltage_v * _HEADROOM),
        "Frequency": (src.frequency_hz - 5.0, src.frequency_hz + 5.0),
        "ActivePower": (0.0, p),
        "RatedPower": (0.0, p),
    }


def _pdb_ranges(site: Site, pdb: PdbConfig) -> dict[str, tuple[float, float]]:
    i = pdb.rated_current_a * _HEADROOM
    return {
        "Voltage": (0.0, site.nominal_voltage_v * _HEADROOM),
        "Current": (0.0, i),
        "CurrentL1": (0.0, i),
        "CurrentL2": (0.0, i),
        "CurrentL3": (0.0, i),
        "RatedCurrent": (0.0, i),
        "ActivePower": (0.0, _three_phase_kw(site.nominal_voltage_v, i)),
    }


def _ats_ranges(site: Site, unit: MicroAtsConfig) -> dict[str, tuple[float, float]]:
    i = unit.rated_current_a * _HEADROOM
    p = _three_phase_kw(site.nominal_voltage_v, i)
    v = (0.0, site.nominal_voltage_v * _HEADROOM)
    return {
        "SourceAVoltage": v,
        "SourceBVoltage": v,
        "LoadCurrent": (0.0, i),
        "RatedCurrent": (0.0, i),
        "LoadPower": (0.0, p),
        "PredictedLoad": (0.0, p),
    }


def _des_ranges(des: StorageConfig) -> dict[str, tuple[float, float]]:
    p = des.max_power_kw * _HEADROOM
    return {
        "EnergyCapacity": (0.0, des.capacity_kwh),
        "ActivePower": (-p, p),
        "MaxDischargePower": (0.0, p),
    }


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


class _SiteInstances:
    """The site's own objects (folders, devices), made with one `_Builder`: the whole site at start
    (`build_site`), or the aisles and units a reload adds (`extend_site`): the same nodes either way."""

    def __init__(self, b: _Builder, site: Site, types_idx: int, known: Mapping[str, ua.NodeId] | None = None) -> None:
        self.b = b
        self.site = site
        self.ns = b.ns
        self.storage_bname = ua.QualifiedName("Storage", types_idx)
        self.known = known or {}  # devices already in the address space (a reload's extension)
        self.device_nodes: dict[str, ua.NodeId] = {}
        self.kinds: dict[str, str] = {}

    def qn(self, name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, self.ns)

    def _device(self, name: str, kind: str, nd: NodeData) -> None:
        if name in self.device_nodes or name in self.known:
            raise ValueError(f"duplicate device name {name!r} in site {self.site.name!r}")
        self.device_nodes[name] = nd.nodeid
        self.kinds[name] = kind

    def source(self, src: SourceConfig, parent: NodeData) -> None:
        b = self.b
        nd = b.instance(
            "PowerSourceType",
            src.name,
            self.qn(src.name),
            f"Power source {src.name} ({src.backup} backup), {src.rated_power_kw:g} kW rated.",
            parent,
            _ORGANIZES,
            values={"RatedPower": b.config_value(float(src.rated_power_kw), ua.VariantType.Double)},
            ranges=_source_ranges(src),
        )
        self._device(src.name, "source", nd)

    def aisle(self, aisle: site_model.AisleConfig, parent: NodeData) -> None:
        aisle_nd = self.b.object(
            aisle.name, self.qn(aisle.name), aisle.name, f"Aisle {aisle.name}.", parent, _ORGANIZES, _FOLDER_TYPE
        )
        for pdb in aisle.pdbs:
            self.pdb(pdb, aisle_nd)
        for unit in aisle.units:
            self.unit(unit, aisle_nd)

    def pdb(self, pdb: PdbConfig, aisle_nd: NodeData) -> None:
        b = self.b
        nd = b.instance(
            "DistributionBusType",
            pdb.name,
            self.qn(pdb.name),
            f"Power distribution bus segment {pdb.name}, {pdb.rated_current_a:g} A rated.",
            aisle_nd,
            _ORGANIZES,
            values={
                "Feed": b.config_value(int(pdb.feed), ua.VariantType.Int32),
                "RatedCurrent": b.config_value(float(pdb.rated_current_a), ua.VariantType.Double),
            },
            ranges=_pdb_ranges(self.site, pdb),
        )
        self._device(pdb.name, "pdb", nd)

    def unit(self, unit: MicroAtsConfig, aisle_nd: NodeData) -> None:
        b = self.b
        nd = b.instance(
            "MicroAtsType",
            unit.name,
            self.qn(unit.name),
            f"Micro-ATS {unit.name} at {unit.position_ft:g} ft in {unit.aisle}, {unit.rated_current_a:g} A rated.",
            aisle_nd,
            _ORGANIZES,
            values={
                "PreferredSource": b.config_value(int(unit.preferred_source), ua.VariantType.Int32),
                "Position": b.config_value(float(unit.position_ft), ua.VariantType.Double),
                "RatedCurrent": b.config_value(float(unit.rated_current_a), ua.VariantType.Double),
            },
            ranges=_ats_ranges(self.site, unit),
        )
        self._device(unit.name, "ats", nd)
        des = unit.storage
        if des is not None:
            snd = b.instance(
                "EnergyStorageType",
                des.name,
                self.storage_bname,
                f"Energy storage {des.name} of {unit.name}: {des.capacity_kwh:g} kWh, {des.max_power_kw:g} kW.",
                nd,
                _HAS_COMPONENT,
                values={"EnergyCapacity": b.config_value(float(des.capacity_kwh), ua.VariantType.Double)},
                ranges=_des_ranges(des),
            )
            self._device(des.name, "des", snd)


async def build_site(server: Server, site: Site) -> SiteModel:
    """Create the instance tree of `site` (types are loaded first if needed); return its handles.

    Works on an initialised or a started server. Runs synchronously apart from the namespace
    registration and type import, so no client sees a half-built tree between two awaits.
    """
    types_idx = await load_information_model(server)
    uri = SITE_NAMESPACE_PREFIX + site.name
    if uri in await server.get_namespace_array():
        raise ValueError(f"site {site.name!r} is already built (namespace {uri} exists)")
    ns = await server.register_namespace(uri)
    aspace: AddressSpace = server.iserver.aspace
    types = _Types(aspace, types_idx)
    b = _Builder(aspace, types, ns)
    made = _SiteInstances(b, site, types_idx)
    qn = made.qn

    folder = _FOLDER_TYPE
    objects = b.nodes[_OBJECTS_FOLDER]
    root = b.object(
        "Site", qn(site.name), site.name, f"Power distribution site {site.name}.", objects, _ORGANIZES, folder, 1
    )
    sources = b.object("Sources", qn("Sources"), "Sources", "The upstream power sources.", root, _ORGANIZES, folder)
    aisles = b.object(
        "Aisles", qn("Aisles"), "Aisles", "The aisles with their buses and micro-ATS units.", root, _ORGANIZES, folder
    )
    for src in site.sources:
        made.source(src, sources)
    for aisle in site.aisles:
        made.aisle(aisle, aisles)

    cmcs = b.instance("CmcsType", "Cmcs", qn("Cmcs"), "Continuous monitoring and control system.", root, _ORGANIZES)
    made._device("Cmcs", "cmcs", cmcs)

    type_ids = dict(types.type_ids)
    type_ids.update({name: nid for nid, name in types.enum_names.items()})
    return SiteModel(
        namespace_uri=uri,
        ns_index=ns,
        types_ns_index=types_idx,
        site_node=root.nodeid,
        points=b.points,
        point_types=b.point_types,
        device_nodes=made.device_nodes,
        devices={nid: name for name, nid in made.device_nodes.items()},
        device_kinds=made.kinds,
        methods=b.methods,
        historized=b.historized,
        type_ids=type_ids,
        node_count=b.count,
    )


# --------------------------------------------------------------------------------------
# A running site's changes (gateway/reload.py): aisles and units added, removed
# --------------------------------------------------------------------------------------


def extend_site(
    server: Server,
    model: SiteModel,
    site: Site,
    aisles: Iterable[site_model.AisleConfig] = (),
    units: Iterable[MicroAtsConfig] = (),
) -> SiteModel:
    """Add whole aisles (under Aisles) and units (under their existing aisle) of `site` to a built
    site: the same nodes, NodeIds and values `build_site(site)` would give them. `model` is updated
    in place; the returned SiteModel holds only what was added (its points, methods, devices), for
    binding methods and access rules. Synchronous: no client sees a half-built unit. ValueError
    (before any node is made) if a name is taken or a unit's aisle is not in the address space."""
    aisles, units = list(aisles), list(units)
    aspace: AddressSpace = server.iserver.aspace
    ns = model.ns_index
    nodes = aspace._nodes
    for aisle in aisles:
        if ua.NodeId(aisle.name, ns, ua.NodeIdType.String) in nodes:
            raise ValueError(f"aisle {aisle.name}: its NodeId is taken in the address space")
    for unit in units:
        if ua.NodeId(unit.aisle, ns, ua.NodeIdType.String) not in nodes:
            raise ValueError(f"{unit.name}: aisle {unit.aisle} is not in the address space")
    new_devices = [u.name for u in units] + [u.storage.name for u in units if u.storage is not None]
    for aisle in aisles:
        new_devices += [p.name for p in aisle.pdbs] + [u.name for u in aisle.units]
        new_devices += [u.storage.name for u in aisle.units if u.storage is not None]
    for name in new_devices:
        if name in model.device_nodes or ua.NodeId(name, ns, ua.NodeIdType.String) in nodes:
            raise ValueError(f"{name}: already in the address space")
    b = _Builder(aspace, _Types(aspace, model.types_ns_index), ns)
    made = _SiteInstances(b, site, model.types_ns_index, known=model.device_nodes)
    aisles_nd = nodes[ua.NodeId("Aisles", ns, ua.NodeIdType.String)]
    for aisle in aisles:
        made.aisle(aisle, aisles_nd)
    for unit in units:
        made.unit(unit, nodes[ua.NodeId(unit.aisle, ns, ua.NodeIdType.String)])
    added = SiteModel(
        namespace_uri=model.namespace_uri,
        ns_index=ns,
        types_ns_index=model.types_ns_index,
        site_node=model.site_node,
        points=b.points,
        point_types=b.point_types,
        device_nodes=made.device_nodes,
        devices={nid: name for name, nid in made.device_nodes.items()},
        device_kinds=made.kinds,
        methods=b.methods,
        historized=b.historized,
        type_ids=model.type_ids,
        node_count=b.count,
    )
    model.points.update(added.points)
    model.point_types.update(added.point_types)
    model.device_nodes.update(added.device_nodes)
    model.devices.update(added.devices)
    model.device_kinds.update(added.device_kinds)
    model.methods.update(added.methods)
    model.historized.extend(added.historized)
    model.node_count += added.node_count
    return added


async def shrink_site(
    server: Server, model: SiteModel, devices: Iterable[str], aisles: Iterable[str] = ()
) -> set[ua.NodeId]:
    """Delete devices (a unit takes its Storage with it) and aisle folders (with everything under
    them) from a built site, and forget them in `model`. Returns the NodeIds deleted."""
    devices = set(devices)
    ns = model.ns_index
    roots = [model.device_nodes[d] for d in devices if d in model.device_nodes]
    roots += [ua.NodeId(a, ns, ua.NodeIdType.String) for a in aisles]
    gone = set(devices)
    for dp in [dp for dp in model.points if dp[0] in gone]:
        nodeid = model.points.pop(dp)
        model.point_types.pop(nodeid, None)
        model.value_slots.pop(dp, None)
    for key in [k for k in model.methods if k[0] in gone]:
        del model.methods[key]
    for d in gone:
        nodeid = model.device_nodes.pop(d, None)
        model.devices.pop(nodeid, None)
        model.device_kinds.pop(d, None)
    deleted = await delete_subtrees(server, roots, ns)
    model.historized[:] = [n for n in model.historized if n in server.iserver.aspace._nodes]
    model.node_count -= len(deleted)
    return deleted


_HIERARCHICAL_DOWN = (_HAS_COMPONENT, _HAS_PROPERTY, _ORGANIZES)
_GONE = ua.StatusCode(ua.StatusCodes.BadNodeIdUnknown)


async def delete_subtrees(server: Server, roots: Iterable[ua.NodeId], ns: int) -> set[ua.NodeId]:
    """Delete each root and every node of namespace `ns` below it (HasComponent, HasProperty,
    Organizes), with every reference to them from nodes that stay; returns the NodeIds deleted.

    Not asyncua's `delete_nodes`: with DeleteTargetReferences it scans the whole address space for
    each deleted node (80k nodes at 1,000 units, ~80 nodes per unit), and it calls the monitored
    items' async datachange callbacks without awaiting them, so a subscribed client never hears of
    the deletion. Here each monitored item of a deleted variable gets one last notification with
    BadNodeIdUnknown (Part 4 7.40.2), then its callback is dropped; the nodes go at once (no await
    between the first and the last), so no client sees half a unit."""
    aspace: AddressSpace = server.iserver.aspace
    nodes = aspace._nodes
    doomed: dict[ua.NodeId, NodeData] = {}
    frontier = [r for r in roots if r in nodes]
    while frontier:
        nodeid = frontier.pop()
        if nodeid in doomed:
            continue
        nd = doomed[nodeid] = nodes[nodeid]
        for ref in nd.references:
            if ref.IsForward and ref.ReferenceTypeId in _HIERARCHICAL_DOWN and ref.NodeId.NamespaceIndex == ns:
                frontier.append(ref.NodeId)
    last = ua.DataValue(StatusCode=_GONE, ServerTimestamp=datetime.now(timezone.utc))
    callbacks = []
    for nd in doomed.values():
        if dict.__contains__(nd.attributes, _A.Value):  # a lazy attribute never read has no callbacks
            callbacks += list(nd.attributes[_A.Value].datachange_callbacks.items())
    for handle, callback in callbacks:
        aspace.delete_datachange_callback(handle)
    neighbours = {ref.NodeId for nd in doomed.values() for ref in nd.references if ref.NodeId not in doomed}
    for nodeid in neighbours:
        other = nodes.get(nodeid)
        if other is not None and any(r.NodeId in doomed for r in other.references):
            other.references[:] = [r for r in other.references if r.NodeId not in doomed]
    for nodeid in doomed:
        del nodes[nodeid]
    for handle, callback in callbacks:
        try:
            result = callback(handle, last)
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - one subscriber must not keep a node alive
            pass
    return set(doomed)


async def write_values(
    server: Server,
    updates: Iterable[tuple[ua.NodeId, ua.DataValue] | tuple[ua.NodeId, ua.DataValue, AttributeValue]],
    *,
    skip_unchanged: bool = True,
    yield_every: int = 2000,
) -> int:
    """Set many Value attributes at once and notify subscriptions (and asyncua's historian).

    Does what `AddressSpace.write_attribute_value` does minus its per-node type check: the
    caller owns the VariantType (`SiteModel.point_types`). A DataValue without a
    ServerTimestamp gets the batch's time; a Bad one has its value set to null (Part 4 7.7.1).
    With `skip_unchanged`, an update whose value and status equal the stored ones is dropped:
    the SourceTimestamp then keeps the time of the last change, as Part 4 7.7.3 defines it,
    and asyncua is spared its costly per-notification deepcopy. Only monitored nodes cost an
    await; the loop is yielded to every `yield_every` notifications so that one big batch
    does not stall the server's sockets. An update may carry the node's Value AttributeValue as a
    third item (fastpath.point_datavalues does) to spare the look-up. Returns the number of values stored.
    """
    nodes = server.iserver.aspace._nodes
    now = datetime.now(timezone.utc)
    notify: list[tuple[dict[int, Callable[..., Any]], ua.DataValue]] = []
    value_attr = _A.Value
    stored = 0
    for update in updates:
        nodeid, dv = update[0], update[1]
        sc = dv.StatusCode
        if sc is not None and sc.is_bad() and dv.Value is not None and dv.Value.VariantType != ua.VariantType.Null:
            dv = ua.DataValue(
                ua.Variant(), StatusCode=sc, SourceTimestamp=dv.SourceTimestamp, ServerTimestamp=dv.ServerTimestamp
            )
        attval = update[2] if len(update) > 2 else nodes[nodeid].attributes[value_attr]
        if skip_unchanged:
            old = attval.value
            if old is not None and old.Value == dv.Value and old.StatusCode == sc:
                continue
        if dv.ServerTimestamp is None:
            dv.ServerTimestamp = now
        attval.value = dv
        attval.value_callback = None
        stored += 1
        if attval.datachange_callbacks:
            notify.append((attval.datachange_callbacks, dv))
    if notify:
        await fastpath.notify(notify, yield_every)
    return stored


# --------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodCall:
    """A validated call of one instance method, as the handler sees it."""

    object_id: ua.NodeId
    device: str
    method: str
    args: tuple[Any, ...]  # python values; enumerations as siteconfig IntEnums
    user: Any = None  # the session's asyncua User, if bind_methods was given a `caller` ContextVar


MethodHandler = Callable[[MethodCall], Awaitable[Any]]


def bind_methods(
    server: Server,
    site: SiteModel,
    handlers: Mapping[str, MethodHandler],
    caller: contextvars.ContextVar[Any] | None = None,
) -> int:
    """Route every instance's method named like a key of `handlers` to that async handler.

    The handler gets a `MethodCall` whose arguments were checked against the method's
    InputArguments (count, type, enumeration range) and returns the output values (a value,
    a sequence, or None), or refuses by returning `ua.StatusCode` or raising a
    `ua.UaStatusCodeError` such as `ua.uaerrors.BadInvalidState()`. asyncua does not pass
    the session to a method; a PermissionRuleset whose `check_validity` stores its `user`
    argument in a ContextVar makes it visible here (see docs/notes/asyncua.md): pass that
    ContextVar as `caller` and `MethodCall.user` is set. Returns how many method nodes were bound.
    """
    for name, handler in handlers.items():
        if not inspect.iscoroutinefunction(handler):
            # asyncua would run a plain function in a thread pool, off the event loop
            raise TypeError(f"handler for {name} must be an async function")
    aspace = server.iserver.aspace
    bound = 0
    for (_device, method), info in site.methods.items():
        handler = handlers.get(method)
        if handler is not None:
            aspace.add_method_callback(info.method_id, partial(_dispatch, info, handler, caller))
            bound += 1
    return bound


def _bad(code: int) -> ua.StatusCode:
    return ua.StatusCode(code)


async def _dispatch(
    info: MethodInfo,
    handler: MethodHandler,
    caller: contextvars.ContextVar[Any] | None,
    object_id: ua.NodeId,
    *inputs: ua.Variant,
) -> Any:
    if object_id != info.object_id:
        # asyncua's MethodService does not check that the method belongs to the object
        return _bad(ua.StatusCodes.BadMethodInvalid)
    if len(inputs) < len(info.inputs):
        return _bad(ua.StatusCodes.BadArgumentsMissing)
    if len(inputs) > len(info.inputs):
        return _bad(ua.StatusCodes.BadTooManyArguments)
    args: list[Any] = []
    results: list[ua.StatusCode] = []
    for variant, arg in zip(inputs, info.inputs, strict=True):
        value, code = _convert_input(variant, arg)
        args.append(value)
        results.append(ua.StatusCode(code))
    if any(r.is_bad() for r in results):
        return ua.CallMethodResult(StatusCode=_bad(ua.StatusCodes.BadInvalidArgument), InputArgumentResults=results)
    try:
        user = caller.get(None) if caller is not None else None
        result = await handler(MethodCall(object_id, info.device, info.method, tuple(args), user))
    except ua.UaStatusCodeError as e:
        return _bad(e.code)
    if isinstance(result, ua.StatusCode | ua.CallMethodResult):
        return result
    if result is None:
        result = ()
    elif not isinstance(result, list | tuple):
        result = (result,)
    if len(result) != len(info.outputs):
        raise ValueError(f"{info.method} handler returned {len(result)} outputs, expected {len(info.outputs)}")
    return [
        v if isinstance(v, ua.Variant) else ua.Variant(int(v) if out.enum else v, out.variant_type)
        for v, out in zip(result, info.outputs, strict=True)
    ]


def _convert_input(variant: ua.Variant, arg: _ArgSpec) -> tuple[Any, int]:
    """(python value, per-argument StatusCode); integer encodings are accepted for enums and ints."""
    vt, value = variant.VariantType, variant.Value
    want = arg.variant_type
    if variant.is_array:
        return None, ua.StatusCodes.BadTypeMismatch
    if arg.enum is not None:
        if vt not in _INTEGER_VARIANTS:
            return None, ua.StatusCodes.BadTypeMismatch
        if int(value) not in arg.enum_values:  # type: ignore[operator]
            return None, ua.StatusCodes.BadOutOfRange
        return arg.enum(int(value)), ua.StatusCodes.Good
    if want == ua.VariantType.Double:
        if vt not in _FLOAT_VARIANTS and vt not in _INTEGER_VARIANTS:
            return None, ua.StatusCodes.BadTypeMismatch
        value = float(value)
        if not math.isfinite(value):
            return None, ua.StatusCodes.BadOutOfRange
        return value, ua.StatusCodes.Good
    if want in _INTEGER_VARIANTS:
        return (int(value), ua.StatusCodes.Good) if vt in _INTEGER_VARIANTS else (None, ua.StatusCodes.BadTypeMismatch)
    if vt != want:
        return None, ua.StatusCodes.BadTypeMismatch
    return value, ua.StatusCodes.Good
