"""Render `spec.py` into the NodeSet2 XML the server loads.

    python -m information_model.gen_nodeset        # rewrites cmcs_power.NodeSet2.xml

A unit test checks that the committed XML equals the rendering, so edit spec.py, not the XML.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from information_model import spec

NODESET_PATH = Path(__file__).with_name("cmcs_power.NodeSet2.xml")

UA_NS = "http://opcfoundation.org/UA/2011/03/UANodeSet.xsd"
UAX_NS = "http://opcfoundation.org/UA/2008/02/Types.xsd"

# ns=0 NodeIds (OPC UA NodeIds.csv)
ALIASES = {
    "Boolean": "i=1",
    "UInt32": "i=7",
    "Double": "i=11",
    "String": "i=12",
    "LocalizedText": "i=21",
    "Argument": "i=296",
    "Range": "i=884",
    "EUInformation": "i=887",
    "Organizes": "i=35",
    "HasModellingRule": "i=37",
    "HasTypeDefinition": "i=40",
    "HasSubtype": "i=45",
    "HasProperty": "i=46",
    "HasComponent": "i=47",
}
BASE_OBJECT_TYPE = "i=58"
BASE_DATA_VARIABLE_TYPE = "i=63"
PROPERTY_TYPE = "i=68"
ANALOG_ITEM_TYPE = "i=2368"
ENUMERATION = "i=29"
ALARM_CONDITION_TYPE = "i=2915"
MANDATORY = "i=78"
OPTIONAL = "i=80"
# DefaultXml encodings, used as ExtensionObject TypeId in XML bodies
ARGUMENT_XML = "i=297"
RANGE_XML = "i=885"
EUINFORMATION_XML = "i=888"

ET.register_namespace("", UA_NS)
ET.register_namespace("uax", UAX_NS)


def _q(tag: str) -> str:
    return f"{{{UA_NS}}}{tag}"


def _x(tag: str) -> str:
    return f"{{{UAX_NS}}}{tag}"


def _nid(i: int) -> str:
    return f"ns=1;i={i}"


def _datatype_ref(name: str) -> str:
    if name in spec.BUILTIN_DATATYPES:
        return name  # alias
    return _nid(spec.enumeration(name).block)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


class _Writer:
    def __init__(self) -> None:
        self.root = ET.Element(_q("UANodeSet"))
        uris = _sub(self.root, _q("NamespaceUris"))
        _sub(uris, _q("Uri"), spec.TYPES_NAMESPACE_URI)
        models = _sub(self.root, _q("Models"))
        model = _sub(
            models,
            _q("Model"),
            ModelUri=spec.TYPES_NAMESPACE_URI,
            Version=spec.MODEL_VERSION,
            PublicationDate=spec.MODEL_PUBLICATION_DATE,
        )
        _sub(
            model,
            _q("RequiredModel"),
            ModelUri="http://opcfoundation.org/UA/",
            Version=spec.BASE_MODEL_VERSION,
            PublicationDate=spec.BASE_MODEL_PUBLICATION_DATE,
        )
        aliases = _sub(self.root, _q("Aliases"))
        for alias, target in ALIASES.items():
            _sub(aliases, _q("Alias"), target, Alias=alias)

    # -- generic node pieces -------------------------------------------------------------
    def _node(
        self, tag: str, nodeid: str, browse_name: str, description: str | None, **attrib: str
    ) -> tuple[ET.Element, ET.Element]:
        el = _sub(self.root, _q(tag), NodeId=nodeid, BrowseName=browse_name, **attrib)
        _sub(el, _q("DisplayName"), browse_name.split(":", 1)[-1])
        if description:
            _sub(el, _q("Description"), description)
        refs = _sub(el, _q("References"))
        return el, refs

    @staticmethod
    def _ref(refs: ET.Element, reftype: str, target: str, forward: bool = True) -> None:
        if forward:
            _sub(refs, _q("Reference"), target, ReferenceType=reftype)
        else:
            _sub(refs, _q("Reference"), target, ReferenceType=reftype, IsForward="false")

    @staticmethod
    def _localized(parent: ET.Element, tag: str, text: str) -> None:
        lt = _sub(parent, tag)
        _sub(lt, _x("Locale"), "en")
        _sub(lt, _x("Text"), text)

    def _extension_object(self, parent: ET.Element, type_id: str) -> ET.Element:
        eo = _sub(parent, _x("ExtensionObject"))
        tid = _sub(eo, _x("TypeId"))
        _sub(tid, _x("Identifier"), type_id)
        return _sub(eo, _x("Body"))

    def _property(
        self,
        nodeid: str,
        browse_name: str,
        parent: str,
        datatype: str,
        description: str | None,
        rule: str = MANDATORY,
        value_rank: int = -1,
        array_len: int | None = None,
    ) -> ET.Element:
        attrib = {"ParentNodeId": parent, "DataType": datatype}
        if value_rank != -1:
            attrib["ValueRank"] = str(value_rank)
        if array_len is not None:
            attrib["ArrayDimensions"] = str(array_len)
        el, refs = self._node("UAVariable", nodeid, browse_name, description, **attrib)
        self._ref(refs, "HasTypeDefinition", PROPERTY_TYPE)
        self._ref(refs, "HasModellingRule", rule)
        self._ref(refs, "HasProperty", parent, forward=False)
        return el

    # -- DataTypes -----------------------------------------------------------------------
    def enumeration(self, e: spec.Enumeration) -> None:
        dt_id, strings_id = _nid(e.block), _nid(e.block + 1)
        el, refs = self._node("UADataType", dt_id, f"1:{e.name}", e.description)
        self._ref(refs, "HasProperty", strings_id)
        self._ref(refs, "HasSubtype", ENUMERATION, forward=False)
        definition = _sub(el, _q("Definition"), Name=f"1:{e.name}")
        for value, (name, desc) in enumerate(e.values):
            field = _sub(definition, _q("Field"), Name=name, Value=str(value))
            _sub(field, _q("Description"), desc)
        prop = self._property(
            strings_id, "EnumStrings", dt_id, "LocalizedText", None, value_rank=1, array_len=len(e.values)
        )
        value = _sub(_sub(prop, _q("Value")), _x("ListOfLocalizedText"))
        for name, _desc in e.values:
            self._localized(value, _x("LocalizedText"), name)

    # -- ObjectTypes ---------------------------------------------------------------------
    def object_type(self, t: spec.ObjectTypeSpec) -> None:
        type_id = _nid(t.block)
        _type_el, refs = self._node("UAObjectType", type_id, f"1:{t.name}", t.description)
        children: list[tuple[str, str]] = []  # (reftype, nodeid) in declaration order
        next_id = t.block + 1
        for m in t.members:
            children.append(("HasComponent", _nid(next_id)))
            next_id = self.member(m, next_id, type_id)
        next_id = t.block + 70
        for meth in t.methods:
            children.append(("HasComponent", _nid(next_id)))
            next_id = self.method(meth, next_id, type_id)
        assert next_id <= t.block + 95, f"{t.name}: NodeId block overflow"
        next_id = t.block + 95
        for bname, typename, desc in t.optional_components:
            children.append(("HasComponent", _nid(next_id)))
            _o, orefs = self._node("UAObject", _nid(next_id), f"1:{bname}", desc, ParentNodeId=type_id)
            self._ref(orefs, "HasTypeDefinition", _nid(spec.object_type(typename).block))
            self._ref(orefs, "HasModellingRule", OPTIONAL)
            self._ref(orefs, "HasComponent", type_id, forward=False)
            next_id += 1
        for reftype, target in children:
            self._ref(refs, reftype, target)
        self._ref(refs, "HasSubtype", BASE_OBJECT_TYPE, forward=False)

    def member(self, m: spec.Member, nodeid: int, parent: str) -> int:
        attrib = {"ParentNodeId": parent, "DataType": _datatype_ref(m.datatype)}
        access = 1 | (2 if m.writable else 0) | (4 if m.historized else 0)  # CurrentRead|CurrentWrite|HistoryRead
        if access != 1:
            attrib["AccessLevel"] = str(access)
        if m.historized:
            attrib["Historizing"] = "true"
        el, refs = self._node("UAVariable", _nid(nodeid), f"1:{m.name}", m.description, **attrib)
        own_id = _nid(nodeid)
        next_id = nodeid + 1
        if m.analog:
            assert m.eu_range is not None, m.name
            range_id, units_id = _nid(next_id), _nid(next_id + 1)
            self._ref(refs, "HasProperty", range_id)
            self._ref(refs, "HasProperty", units_id)
            self._ref(refs, "HasTypeDefinition", ANALOG_ITEM_TYPE)
            next_id += 2
        else:
            self._ref(refs, "HasTypeDefinition", BASE_DATA_VARIABLE_TYPE)
        self._ref(refs, "HasModellingRule", MANDATORY)
        self._ref(refs, "HasComponent", parent, forward=False)
        if m.analog:
            lo, hi = m.eu_range  # type: ignore[misc]
            prop = self._property(range_id, "EURange", own_id, "Range", "Normal operating range of the value.")
            body = self._extension_object(_sub(prop, _q("Value")), RANGE_XML)
            rng = _sub(body, _x("Range"))
            _sub(rng, _x("Low"), repr(float(lo)))
            _sub(rng, _x("High"), repr(float(hi)))
            unit = spec.UNITS[m.unit]  # type: ignore[index]
            prop = self._property(units_id, "EngineeringUnits", own_id, "EUInformation", f"Unit: {unit.name}.")
            body = self._extension_object(_sub(prop, _q("Value")), EUINFORMATION_XML)
            eu = _sub(body, _x("EUInformation"))
            _sub(eu, _x("NamespaceUri"), spec.UNECE_NAMESPACE_URI)
            _sub(eu, _x("UnitId"), str(unit.unit_id))
            self._localized(eu, _x("DisplayName"), unit.symbol)
            self._localized(eu, _x("Description"), unit.name)
        return next_id

    def method(self, meth: spec.Method, nodeid: int, parent: str) -> int:
        own_id = _nid(nodeid)
        _el, refs = self._node("UAMethod", own_id, f"1:{meth.name}", meth.description, ParentNodeId=parent)
        next_id = nodeid + 1
        props = []
        for bname, args in (("InputArguments", meth.inputs), ("OutputArguments", meth.outputs)):
            if args:
                props.append((bname, _nid(next_id), args))
                self._ref(refs, "HasProperty", _nid(next_id))
                next_id += 1
        self._ref(refs, "HasModellingRule", MANDATORY)
        self._ref(refs, "HasComponent", parent, forward=False)
        for bname, pid, args in props:
            prop = self._property(pid, bname, own_id, "Argument", None, value_rank=1, array_len=len(args))
            lst = _sub(_sub(prop, _q("Value")), _x("ListOfExtensionObject"))
            for a in args:
                arg = _sub(self._extension_object(lst, ARGUMENT_XML), _x("Argument"))
                _sub(arg, _x("Name"), a.name)
                _sub(_sub(arg, _x("DataType")), _x("Identifier"), ALIASES.get(a.datatype) or _datatype_ref(a.datatype))
                _sub(arg, _x("ValueRank"), "-1")
                _sub(arg, _x("ArrayDimensions"))
                self._localized(arg, _x("Description"), a.description)
        return next_id

    # -- Alarm types ---------------------------------------------------------------------
    def alarm_type(self, a: spec.AlarmTypeSpec) -> None:
        type_id = _nid(a.nodeid)
        _el, refs = self._node("UAObjectType", type_id, f"1:{a.name}", a.description)
        for i, _p in enumerate(a.properties, start=1):
            self._ref(refs, "HasProperty", _nid(a.nodeid + i))
        self._ref(refs, "HasSubtype", ALARM_CONDITION_TYPE, forward=False)
        for i, (name, datatype, desc) in enumerate(a.properties, start=1):
            self._property(_nid(a.nodeid + i), f"1:{name}", type_id, _datatype_ref(datatype), desc)


def render() -> str:
    """The NodeSet2 XML text for the current spec."""
    w = _Writer()
    for e in spec.ENUMERATIONS:
        w.enumeration(e)
    for t in spec.OBJECT_TYPES:
        w.object_type(t)
    for a in spec.ALARM_TYPES:
        w.alarm_type(a)
    ET.indent(w.root, space="  ")
    body = ET.tostring(w.root, encoding="unicode")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + body + "\n"


def main(argv: list[str] | None = None) -> int:
    out = Path(argv[0]) if argv else NODESET_PATH
    out.write_text(render(), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
