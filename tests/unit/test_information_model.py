"""The PowerDistribution NodeSet and the bulk site builder, against a real asyncua server and client."""

from __future__ import annotations

import asyncio
import contextvars
import pickle
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from asyncua import Client, Server, ua
from asyncua.crypto.permission_rules import SimpleRoleRuleset, User, UserRole

from information_model import gen_nodeset, spec
from information_model.instantiate import (
    NODESET_PATH,
    MethodCall,
    SiteModel,
    bind_methods,
    build_site,
    load_information_model,
    write_values,
)
from siteconfig.demo import free_port
from siteconfig.model import (
    AisleConfig,
    DeviceEndpoint,
    MicroAtsConfig,
    PdbConfig,
    Site,
    SourceConfig,
    SourceSelection,
    StorageConfig,
)

SITE_URI = "urn:cmcs-gateway:site:Test"

# One server per module (asyncua's init takes ~1 s and stop another 1 s). Tests must not rely
# on each other: the bulk-write test leaves MATS-01-02 alone, which others read untouched.
pytestmark = pytest.mark.asyncio(loop_scope="module")
UNTOUCHED = "MATS-01-02"


def make_site(name: str = "Test", aisles: int = 2, units: int = 3, storage_every: int = 1) -> Site:
    """A site of `aisles` x `units` micro-ATS units, two PDB segments per aisle, dummy endpoints."""
    ep = DeviceEndpoint(driver="modbus", profile="dummy")  # never connected: no driver runs here
    sources = (
        SourceConfig("SourceA", SourceSelection.SOURCE_A, 2000.0, "ups", 415.0, 50.0, ep),
        SourceConfig("SourceB", SourceSelection.SOURCE_B, 2000.0, "generator", 415.0, 50.0, ep),
    )
    out = []
    for a in range(1, aisles + 1):
        aisle = f"Aisle{a:02d}"
        pdbs = (
            PdbConfig(f"PDB-{a:02d}-A", aisle, SourceSelection.SOURCE_A, 400.0, 4, ep),
            PdbConfig(f"PDB-{a:02d}-B", aisle, SourceSelection.SOURCE_B, 400.0, 4, ep),
        )
        mats = []
        for u in range(1, units + 1):
            des = StorageConfig(f"DES-{a:02d}-{u:02d}", 5.0, 20.0, 10.0, 95.0, ep) if u % storage_every == 0 else None
            mats.append(
                MicroAtsConfig(f"MATS-{a:02d}-{u:02d}", aisle, 4.0 * u, 63.0, SourceSelection.SOURCE_A, 12.0, 0.5, 8.0, ep, des)
            )
        out.append(AisleConfig(aisle, pdbs, tuple(mats)))
    return Site(name, 415.0, 50.0, sources, tuple(out))


@dataclass
class Running:
    server: Server
    model: SiteModel
    url: str


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def running() -> AsyncIterator[Running]:
    server = Server()
    await server.init()
    url = f"opc.tcp://127.0.0.1:{free_port()}/cmcs"
    server.set_endpoint(url)
    model = await build_site(server, make_site(storage_every=2))
    async with server:
        yield Running(server, model, url)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(running: Running) -> AsyncIterator[Client]:
    async with Client(running.url, timeout=10) as c:
        yield c


_SAMPLE = {
    ua.VariantType.Double: lambda x: x,
    ua.VariantType.Boolean: lambda x: True,
    ua.VariantType.Int32: lambda x: 1,  # enumerations
    ua.VariantType.UInt32: lambda x: 1,
    ua.VariantType.String: lambda x: "v1",
}


def _all_values(model: SiteModel, x: float) -> dict[ua.NodeId, ua.DataValue]:
    """A value of the right VariantType for every variable of the site."""
    return {
        nid: ua.DataValue(ua.Variant(_SAMPLE[vt](x), vt)) for nid, vt in model.point_types.items()
    }


# -- the NodeSet ---------------------------------------------------------------------------


async def test_committed_nodeset_is_rendered_from_spec() -> None:
    assert NODESET_PATH.read_text(encoding="utf-8") == gen_nodeset.render(), (
        "cmcs_power.NodeSet2.xml is stale: run python -m information_model.gen_nodeset"
    )


async def test_unece_unit_ids() -> None:
    # OPC UA Part 8 5.6.3 worked values
    assert spec.unece_unit_id("CEL") == 4408652
    assert spec.unece_unit_id("P1") == 20529
    assert spec.unece_unit_id("VLT") == 5655636


async def test_nodeset_loads_with_enumerations() -> None:
    server = Server()
    await server.init()
    idx = await load_information_model(server)
    await server.load_data_type_definitions()
    assert (await server.get_namespace_array())[idx] == spec.TYPES_NAMESPACE_URI
    for e in spec.ENUMERATIONS:
        dt = server.get_node(ua.NodeId(e.block, idx))
        assert (await dt.read_browse_name()).Name == e.name
        assert (await dt.read_node_class()) == ua.NodeClass.DataType
        supertype = await dt.get_parent()  # inverse HasSubtype
        assert supertype.nodeid == ua.NodeId(ua.ObjectIds.Enumeration)
        strings = await (await dt.get_child("0:EnumStrings")).read_value()
        assert [t.Text for t in strings] == [name for name, _ in e.values]
        definition = await dt.read_data_type_definition()
        assert [(f.Name, f.Value) for f in definition.Fields] == [(n, i) for i, (n, _) in enumerate(e.values)]
    # a second load is a no-op
    assert await load_information_model(server) == idx


# -- the instance tree, seen by a client ---------------------------------------------------


async def test_instance_variable_datatype_units_and_range(running: Running, client: Client) -> None:
    types_idx = await client.get_namespace_index(spec.TYPES_NAMESPACE_URI)
    site_idx = await client.get_namespace_index(SITE_URI)
    mats = client.get_node(ua.NodeId(UNTOUCHED, site_idx))
    mats_type = ua.NodeId(spec.MICRO_ATS.block, types_idx)
    assert await mats.read_type_definition() == mats_type

    active = await mats.get_child(f"{types_idx}:ActiveSource")
    assert await active.read_data_type() == ua.NodeId(spec.enumeration("SourceSelection").block, types_idx)
    assert (await active.read_description()).Text
    assert await active.read_type_definition() == ua.NodeId(ua.ObjectIds.BaseDataVariableType)
    assert not await active.get_referenced_nodes(ua.ObjectIds.HasModellingRule)  # not on instances

    temp = await mats.get_child(f"{types_idx}:ContactTemperature")
    assert temp.nodeid == running.model.points[(UNTOUCHED, "ContactTemperature")]
    assert await temp.read_data_type() == ua.NodeId(ua.ObjectIds.Double)
    assert await temp.read_type_definition() == ua.NodeId(ua.ObjectIds.AnalogItemType)
    eu = await (await temp.get_child("0:EngineeringUnits")).read_value()
    assert (eu.NamespaceUri, eu.UnitId, eu.DisplayName.Text) == (spec.UNECE_NAMESPACE_URI, spec.unece_unit_id("CEL"), "°C")
    assert await (await temp.get_child("0:EURange")).read_value() == ua.Range(-20.0, 150.0)

    # site-specific range and configured value: 63 A unit, 125 % headroom
    rated = await mats.get_child(f"{types_idx}:RatedCurrent")
    assert await (await rated.get_child("0:EURange")).read_value() == ua.Range(0.0, 63.0 * 1.25)
    assert await rated.read_value() == 63.0
    # not yet polled
    dv = await temp.read_data_value(raise_on_bad_status=False)
    assert dv.StatusCode.value == ua.StatusCodes.BadWaitingForInitialData

    # every attribute a browser asks for reads without a service error
    for aid in ua.AttributeIds:
        await temp.read_attribute(aid, raise_on_bad_status=False)

    storage = await mats.get_child(f"{types_idx}:Storage")
    assert storage.nodeid == ua.NodeId("DES-01-02", site_idx)
    assert await storage.read_type_definition() == ua.NodeId(spec.ENERGY_STORAGE.block, types_idx)
    assert (await (await storage.get_child(f"{types_idx}:StateOfCharge")).read_data_type()) == ua.NodeId(ua.ObjectIds.Double)
    inputs = await storage.get_child([f"{types_idx}:StartBridging", "0:InputArguments"])
    assert [arg.Name for arg in await inputs.read_value()] == ["Power", "Duration"]
    # MATS-01-01 has no DES unit (storage_every=2): the Optional component is absent
    with pytest.raises(ua.UaStatusCodeError):
        await client.get_node(ua.NodeId("MATS-01-01", site_idx)).get_child(f"{types_idx}:Storage")


async def test_browse_finds_every_micro_ats_by_type_definition(running: Running, client: Client) -> None:
    types_idx = await client.get_namespace_index(spec.TYPES_NAMESPACE_URI)
    mats_type = ua.NodeId(spec.MICRO_ATS.block, types_idx)
    found: set[str] = set()
    frontier = [client.nodes.objects]
    seen: set[ua.NodeId] = set()
    while frontier:
        node = frontier.pop()
        for ref in await node.get_children_descriptions(refs=ua.ObjectIds.HierarchicalReferences):
            if ref.NodeClass != ua.NodeClass.Object or ref.NodeId in seen or ref.NodeId.NamespaceIndex == 0:
                continue
            seen.add(ref.NodeId)
            if ref.TypeDefinition == mats_type:
                found.add(ref.BrowseName.Name)
            frontier.append(client.get_node(ref.NodeId))
    expected = {name for name, kind in running.model.device_kinds.items() if kind == "ats"}
    assert found == expected and len(expected) == 6

    # the documented layout
    site_idx = await client.get_namespace_index(SITE_URI)
    path = [f"{site_idx}:Test", f"{site_idx}:Aisles", f"{site_idx}:Aisle02", f"{site_idx}:PDB-02-B"]
    pdb = await client.nodes.objects.get_child(path)
    assert pdb.nodeid == running.model.device_nodes["PDB-02-B"]
    src = await client.nodes.objects.get_child([f"{site_idx}:Test", f"{site_idx}:Sources", f"{site_idx}:SourceB"])
    assert await src.read_type_definition() == ua.NodeId(spec.POWER_SOURCE.block, types_idx)
    cmcs = await client.nodes.objects.get_child([f"{site_idx}:Test", f"{site_idx}:Cmcs"])
    assert await cmcs.read_type_definition() == ua.NodeId(spec.CMCS.block, types_idx)


async def test_method_call_reaches_handler_with_instance(running: Running, client: Client) -> None:
    calls: list[MethodCall] = []

    async def switch_source(call: MethodCall) -> float:
        calls.append(call)
        if call.device == "MATS-02-03":
            raise ua.uaerrors.BadInvalidState()
        return 7.5

    async def start_bridging(call: MethodCall) -> None:
        calls.append(call)

    async def set_preferred(call: MethodCall) -> ua.StatusCode:
        return ua.StatusCode(ua.StatusCodes.BadTooManyOperations)

    bound = bind_methods(
        running.server,
        running.model,
        {"SwitchSource": switch_source, "StartBridging": start_bridging, "SetPreferredSource": set_preferred},
    )
    assert bound == 6 + 6 + 2  # two MicroAts methods on 6 units, StartBridging on 2 DES units
    types_idx = await client.get_namespace_index(spec.TYPES_NAMESPACE_URI)
    model = running.model
    obj = client.get_node(model.device_nodes["MATS-01-02"])
    method = await obj.get_child(f"{types_idx}:SwitchSource")
    assert method.nodeid == model.methods[("MATS-01-02", "SwitchSource")].method_id

    out = await obj.call_method(method, ua.Variant(2, ua.VariantType.Int32))
    assert out == 7.5
    assert calls[-1].object_id == model.device_nodes["MATS-01-02"]
    assert calls[-1].args == (SourceSelection.SOURCE_B,)
    assert model.devices[calls[-1].object_id] == "MATS-01-02"

    # a plain Python int from asyncua's client arrives as Int64: accepted for an enumeration
    assert await obj.call_method(method, 1) == 7.5

    n_calls = len(calls)
    with pytest.raises(ua.uaerrors.BadInvalidArgument):  # outside the enumeration
        await obj.call_method(method, ua.Variant(7, ua.VariantType.Int32))
    with pytest.raises(ua.uaerrors.BadInvalidArgument):  # wrong type
        await obj.call_method(method, ua.Variant("SourceA", ua.VariantType.String))
    with pytest.raises(ua.uaerrors.BadArgumentsMissing):
        await obj.call_method(method)
    with pytest.raises(ua.uaerrors.BadMethodInvalid):  # MATS-01-02's method on another object
        await client.get_node(model.device_nodes["MATS-01-01"]).call_method(method, ua.Variant(1, ua.VariantType.Int32))
    assert len(calls) == n_calls  # refused before the handler

    other = client.get_node(model.device_nodes["MATS-02-03"])
    with pytest.raises(ua.uaerrors.BadInvalidState):
        await other.call_method(f"{types_idx}:SwitchSource", ua.Variant(1, ua.VariantType.Int32))
    with pytest.raises(ua.uaerrors.BadTooManyOperations):
        await other.call_method(f"{types_idx}:SetPreferredSource", ua.Variant(1, ua.VariantType.Int32))

    des = client.get_node(model.device_nodes["DES-01-02"])
    assert await des.call_method(f"{types_idx}:StartBridging", 12.0, ua.Variant(30.0, ua.VariantType.Double)) is None
    assert (calls[-1].device, calls[-1].method, calls[-1].args) == ("DES-01-02", "StartBridging", (12.0, 30.0))

    with pytest.raises(ua.uaerrors.BadNothingToDo):  # not bound: asyncua's answer
        await des.call_method(f"{types_idx}:StopBridging")


async def test_method_handler_learns_the_calling_user() -> None:
    """The ContextVar hook of docs/notes/asyncua.md: check_validity runs in the task that runs the method."""
    caller: contextvars.ContextVar[User | None] = contextvars.ContextVar("caller", default=None)

    class Rules(SimpleRoleRuleset):
        def check_validity(self, user, action_type_id, body) -> bool:  # noqa: ANN001
            caller.set(user)
            return super().check_validity(user, action_type_id, body)

    class Users:
        def get_user(self, iserver, username=None, password=None, certificate=None) -> User:  # noqa: ANN001
            return User(role=UserRole.User, name=username)

    server = Server(user_manager=Users())
    await server.init()
    url = f"opc.tcp://127.0.0.1:{free_port()}/cmcs"
    server.set_endpoint(url)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity], permission_ruleset=Rules())
    model = await build_site(server, make_site(aisles=1, units=1))
    seen: list[str] = []

    async def set_mode(call: MethodCall) -> None:
        seen.append(call.user.name)

    bind_methods(server, model, {"SetMode": set_mode}, caller=caller)
    method = model.methods[("Cmcs", "SetMode")].method_id
    async with server:
        for name in ("alice", "bob"):
            c = Client(url, timeout=10)
            c.set_user(name)
            c.set_password("pw")
            async with c:
                await c.get_node(model.device_nodes["Cmcs"]).call_method(method, ua.Variant(2, ua.VariantType.Int32))
    assert seen == ["alice", "bob"]


async def test_bulk_written_values_reach_a_subscribed_client(running: Running, client: Client) -> None:
    model = running.model
    temp = model.points[("MATS-01-01", "ContactTemperature")]
    active = model.points[("MATS-01-01", "ActiveSource")]
    count = model.points[("MATS-01-01", "TransferCount")]
    received: asyncio.Queue[tuple[ua.NodeId, ua.DataValue]] = asyncio.Queue()

    class Handler:
        def datachange_notification(self, node, val, data) -> None:  # noqa: ANN001
            received.put_nowait((node.nodeid, data.monitored_item.Value))

    sub = await client.create_subscription(20, Handler())
    await sub.subscribe_data_change([client.get_node(n) for n in (temp, active, count)])
    for _ in range(3):  # initial values (BadWaitingForInitialData)
        await asyncio.wait_for(received.get(), 5)

    by_id = {nid: dv for nid, dv in _all_values(model, 21.5).items() if not nid.Identifier.startswith(UNTOUCHED)}
    by_id[active] = ua.DataValue(ua.Variant(int(SourceSelection.SOURCE_B), ua.VariantType.Int32))
    by_id[count] = ua.DataValue(ua.Variant(3, ua.VariantType.UInt32))
    await write_values(running.server, list(by_id.items()))
    got = {}
    while len(got) < 3:
        nid, dv = await asyncio.wait_for(received.get(), 5)
        got[nid] = dv
    assert got[temp].Value == ua.Variant(21.5, ua.VariantType.Double)
    assert got[active].Value == ua.Variant(2, ua.VariantType.Int32)
    assert got[count].Value == ua.Variant(3, ua.VariantType.UInt32)
    assert got[temp].ServerTimestamp is not None
    assert await client.get_node(temp).read_value() == by_id[temp].Value.Value

    # a Bad status reaches the client, without a value (Part 4 7.7.1)
    bad = ua.DataValue(ua.Variant(99.0, ua.VariantType.Double), StatusCode=ua.StatusCode(ua.StatusCodes.BadCommunicationError))
    await write_values(running.server, [(temp, bad)])
    nid, dv = await asyncio.wait_for(received.get(), 5)
    assert nid == temp and dv.StatusCode.value == ua.StatusCodes.BadCommunicationError and dv.Value.Value is None
    await sub.delete()


async def test_client_write_to_writable_setpoint(running: Running, client: Client) -> None:
    threshold = client.get_node(running.model.points[("Cmcs", "RiskThreshold")])
    assert await threshold.read_attribute(ua.AttributeIds.AccessLevel) is not None
    await threshold.write_value(ua.DataValue(ua.Variant(0.7, ua.VariantType.Double)))
    assert await threshold.read_value() == 0.7
    with pytest.raises(ua.uaerrors.BadUserAccessDenied):  # read-only for a non-admin session
        await client.get_node(running.model.points[("Cmcs", "CycleTime")]).write_value(
            ua.DataValue(ua.Variant(1.0, ua.VariantType.Double))
        )


async def test_model_handles(running: Running) -> None:
    model = running.model
    kinds = list(model.device_kinds.values())
    assert kinds.count("ats") == 6 and kinds.count("des") == 2 and kinds.count("pdb") == 4
    assert kinds.count("source") == 2 and kinds.count("cmcs") == 1
    assert set(model.devices.values()) == set(model.device_nodes)
    for dev, method in model.methods:
        assert model.devices[model.methods[(dev, method)].object_id] == dev
    assert model.points[("SourceA", "BackupReady")].Identifier == "SourceA.BackupReady"
    assert model.points[("PDB-01-A", "JointTemperature")] in model.historized
    assert model.points[("MATS-01-01", "Position")] not in model.historized
    with pytest.raises(ValueError, match="already built"):
        await build_site(running.server, make_site())


async def test_lazy_attributes_behave_like_a_dict(running: Running) -> None:
    nodes = running.server.iserver.aspace
    nid = running.model.points[("PDB-01-A", "Voltage")]
    attrs = nodes[nid].attributes
    assert ua.AttributeIds.DataType in attrs and ua.AttributeIds.NodeId in attrs
    assert ua.AttributeIds.IsAbstract not in attrs and attrs.get(ua.AttributeIds.IsAbstract) is None
    assert attrs[ua.AttributeIds.NodeId].value.Value.Value == nid
    assert len(attrs) == len(dict(attrs.items())) >= 14
    # each node owns its AttributeValue: writing one node's attribute leaves its siblings alone
    other = nodes[running.model.points[("PDB-01-B", "Voltage")]].attributes
    assert attrs[ua.AttributeIds.Description] is not other[ua.AttributeIds.Description]
    copy = pickle.loads(pickle.dumps(nodes[nid]))
    assert copy.attributes[ua.AttributeIds.DataType].value == attrs[ua.AttributeIds.DataType].value


# -- scale ---------------------------------------------------------------------------------


async def test_thousand_unit_site_build_and_update_time(capsys: pytest.CaptureFixture[str]) -> None:
    server = Server()
    await server.init()
    await load_information_model(server)
    site = make_site("Big", aisles=50, units=20)
    t0 = time.perf_counter()
    model = await build_site(server, site)
    build_s = time.perf_counter() - t0
    updates = list(_all_values(model, 1.0).items())
    t0 = time.perf_counter()
    await write_values(server, updates)
    write_s = time.perf_counter() - t0
    assert len(site.units) == 1000 and len(site.storages) == 1000
    with capsys.disabled():
        print(
            f"\n1,000-unit site: {model.node_count} nodes, {model.variable_count} variables;"
            f" build {build_s:.2f} s, bulk update of all variables {write_s * 1000:.0f} ms"
        )
