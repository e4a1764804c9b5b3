"""The baseline of `cmcs bench gateway`: a plain asyncua server built the naive way.

Same drivers, same point table, same command service, same points; but the address space is
made with one awaited `add_variable` per node (types inferred by asyncua from the first value,
no information model) and every change is written with one awaited `write_value` per node,
as the asyncua examples do it.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from asyncua import Server, ua

from drivers.pointtable import Change, PointTable, Quality
from gateway.server import QUALITY_STATUS
from siteconfig.points import POINTS


class NaiveServer:
    def __init__(self, site, table: PointTable, commands, host: str, port: int):
        self.site, self.table, self.commands = site, table, commands
        self.url = f"opc.tcp://{host}:{port}/cmcs"
        self.server = Server()
        self.nodes = {}
        self.queue: asyncio.Queue[Change] = asyncio.Queue()
        self._task = None

    async def start(self) -> None:
        server = self.server
        await server.init()
        server.set_endpoint(self.url)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        ns = await server.register_namespace(f"urn:cmcs-gateway:site:{self.site.name}")
        objects = server.nodes.objects
        for name, kind, _ep in self.site.devices():
            obj = await objects.add_object(ua.NodeId(name, ns), ua.QualifiedName(name, ns))
            for p in POINTS[kind]:
                initial = False if p.kind == "bool" else (0 if p.kind != "float" else 0.0)
                var = await obj.add_variable(ua.NodeId(f"{name}.{p.name}", ns), ua.QualifiedName(p.name, ns), initial)
                self.nodes[(name, p.name)] = var
            if kind == "ats":
                await obj.add_method(ua.NodeId(f"{name}.SwitchSource", ns), ua.QualifiedName("SwitchSource", ns),
                                     self._switch_source, [ua.VariantType.Int32], [ua.VariantType.Double])
        self.table.add_sink(self._on_changes)
        await server.start()
        self._task = asyncio.create_task(self._writer())

    def _on_changes(self, changes) -> None:
        for c in changes:
            self.queue.put_nowait(c)

    async def _writer(self) -> None:
        while True:
            c = await self.queue.get()
            var = self.nodes.get((c.device, c.point))
            if var is None or c.value is None:
                continue
            dv = ua.DataValue(ua.Variant(c.value), StatusCode=QUALITY_STATUS[c.quality],
                              SourceTimestamp=datetime.fromtimestamp(c.source_ts, timezone.utc))
            try:
                await var.write_value(dv)
            except ua.UaError:
                pass  # a value whose inferred type does not match (the naive way's known weakness)

    async def _switch_source(self, parent, target):
        device = parent.Identifier
        outcome = await self.commands.switch_source(device, int(target.Value))
        if not outcome.ok:
            return ua.StatusCode(outcome.status)
        return [ua.Variant(float(outcome.outputs[0]), ua.VariantType.Double)]

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await self.server.stop()
