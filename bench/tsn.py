"""`cmcs bench tsn`: command latency through the time-aware schedule, with and without a flood.

The bench makes two network namespaces joined by a veth pair (tsnwire.netns) and runs two
processes, one per namespace:

* the gateway end: the transmit scheduler (tsnwire.schedule, the one the driver uses) with the
  gate control list of a 1 ms cycle, a command generator thread that builds one signed and
  encrypted SwitchSource frame per cycle at a random phase and enqueues it (the enqueue time,
  CLOCK_MONOTONIC, is the start of the latency), and, in the flood cases, a best-effort flood the
  scheduler offers itself each cycle: 2x what the 100 Mbit/s link carries (a per-cycle byte
  budget), 1518-byte frames of another EtherType, bounded by the 1000-frame queue;
* the device end: a thread blocked in recvmsg on an AF_PACKET socket that stamps each command
  frame on CLOCK_MONOTONIC as it gets it (the end of the latency; both namespaces share the
  clock), then opens it (signature, replay window, decryption) as the device would.

Cases (docs/interface.md section 7): schedule_on_idle, schedule_on_flood, schedule_off_flood (one
FIFO for every class at the same link rate, tail drop, no gates) and modbus_tcp (the same command
as a Modbus TCP write over the same veth pair, pymodbus client and server, one per cycle,
latency to the server's write hook), and schedule_on_flood_enqueuer_not_rt (the flood case with
the enqueuing thread at normal priority, as the driver's asyncio thread is: what the GIL costs).

A missed cycle is a command not received within its cycle: the cycle whose command window it
was enqueued for (the current one if enqueued while the window is open, up to 60 us before it
closes, else the next one),
received after that cycle's end, or never; for Modbus TCP (no windows) the cycle it was enqueued
in. `over_one_cycle_percent` is the stricter count of latencies above one cycle (1 ms).
Each case runs >= 60,000 cycles (--quick: 3,000). The bench processes run with the garbage
collector frozen (gc.freeze + gc.disable: a gen-2 pass over 60,000 entries is a ms-long pause).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

CYCLE_US = 1000
CYCLES = 60_000
QUICK_CYCLES = 3_000
LINK_RATE_MBPS = 100.0
FLOOD_FACTOR = 2.0  # offered best effort / link capacity
FLOOD_ETHERTYPE = 0x88B5  # IEEE 802 local experimental EtherType: not UADP, filtered out at the device
VLAN = 10
GW_IP, DEV_IP = "10.231.0.1", "10.231.0.2"
MODBUS_PORT = 1502
CASES = ("schedule_on_idle", "schedule_on_flood", "schedule_off_flood", "modbus_tcp",
         "schedule_on_flood_enqueuer_not_rt")
# A command enqueued this close to its window's end is for the next cycle's window (the frame takes 11 us at
# 100 Mbit/s; the margin covers the enqueuing thread's own delays).
WINDOW_END_MARGIN_NS = 60_000
RT_PRIORITY = 60  # SCHED_FIFO priority of the gateway's scheduler thread (its enqueuer: one less)
# The device's receive thread, lower: both ends share this machine's 2 CPUs, and a device thread of the same
# priority woken on the scheduler's CPU by the frame it sent holds that CPU ~100-170 us (FIFO does not
# preempt equals), which made commands enqueued inside their window wait for the next (measured).
DEVICE_RT_PRIORITY = 50
TARGETS = {"p99_us": 2000.0, "max_us": 5000.0, "missed_cycles_percent": 0.1, "off_on_p99_ratio": 5.0}


# ---- the two ends (run in their namespaces as `python -m bench.tsn --role ...`) -------------------------
def _gcl():
    from tsnwire.schedule import COMMAND, TELEMETRY, GateControlList, Window

    return GateControlList(CYCLE_US, (Window(COMMAND, 6, 0, 200), Window(TELEMETRY, 5, 200, 300)),
                           link_rate_mbps=LINK_RATE_MBPS)


def _role_device(args) -> int:
    """Stamp every command frame's receipt; open it; write {request_id: receipt ns} when done."""
    from tsnwire import uadp
    from tsnwire.keys import load_key_file
    from tsnwire.link import open_link, receive
    from tsnwire.security import Dropped, Subscriber

    sub = Subscriber(load_key_file(args.key), max_age_ns=10**9)
    if args.rt:  # a device's receive path is real-time too
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt))
    sock = open_link(args.interface, blocking=True)
    sock.settimeout(0.5)
    received: dict[int, int] = {}
    pcps: dict[int, int] = {}
    dropped = 0
    deadline = time.monotonic() + args.seconds
    print("ready", flush=True)
    while time.monotonic() < deadline:
        try:
            frame = receive(sock)
        except TimeoutError:
            continue
        t = time.monotonic_ns()
        if frame is None:
            continue
        try:
            msg = uadp.decode_network_message(frame.payload)
            _seq, data = uadp.decode_dataset_message(sub.open(msg, frame.rx_unix_ns))
            fields = uadp.COMMAND_LAYOUT.unpack(data)
        except (Dropped, ValueError):
            dropped += 1
            continue
        received[fields["RequestId"]] = t
        pcps[frame.pcp] = pcps.get(frame.pcp, 0) + 1
        if fields["RequestId"] >= args.last_id:
            break
    Path(args.out).write_text(json.dumps({"received": received, "pcp": pcps, "dropped": dropped}))
    return 0


def _role_gateway(args) -> int:
    """Run the scheduler (gated or FIFO, flood or not) and one command per cycle; write enqueue times."""
    from tsnwire import uadp
    from tsnwire.keys import load_key_file
    from tsnwire.link import interface_mac, open_link
    from tsnwire.schedule import BEST_EFFORT, COMMAND, ETHERNET_OVERHEAD_BYTES, TransmitScheduler
    from tsnwire.security import Publisher

    gcl = _gcl()
    sock = open_link(args.interface)
    sock.setblocking(True)
    own, dev = interface_mac(args.interface), uadp.mac_bytes(args.device_mac)
    flood_frame = (dev + own + (0x8100).to_bytes(2, "big") + (gcl.best_effort_pcp << 13 | VLAN).to_bytes(2, "big")
                   + FLOOD_ETHERTYPE.to_bytes(2, "big") + bytes(1518 - 18))
    link_bytes_per_cycle = LINK_RATE_MBPS * CYCLE_US / 8  # bits/us * us / 8
    flood = int(FLOOD_FACTOR * link_bytes_per_cycle) if args.flood else 0
    sched = TransmitScheduler(sock.send, gcl, enabled=not args.schedule_off, flood_bytes_per_cycle=flood,
                              flood_frame=flood_frame, realtime_priority=args.rt or None)
    pub = Publisher(uadp.GATEWAY_PUBLISHER_ID, load_key_file(args.key))
    header = uadp.ethernet_header(dev, own, VLAN, gcl.pcp_of(COMMAND))
    enqueued: dict[int, int] = {}
    sent_at: dict[int, int] = {}  # when the scheduler handed each command to the socket
    rng = random.Random(1)
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    sched.start()
    if args.rt and not args.enqueuer_not_rt:  # else the GIL's priority inversion: see the module docstring
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt - 1))
    time.sleep(0.05)
    cycle_s = CYCLE_US / 1e6
    t_next = time.monotonic() + cycle_s
    for request_id in range(1, args.cycles + 1):
        fields = uadp.command_fields("ats", "SwitchSource", request_id, {"Target": 1 + request_id % 2})
        payload = uadp.encode_dataset_message(request_id, uadp.COMMAND_LAYOUT.pack(fields))
        frame = header + pub.seal(uadp.COMMAND_WRITER_ID, payload)
        delay = t_next + rng.random() * cycle_s - time.monotonic()  # a random phase in the cycle
        if delay > 0:
            time.sleep(delay)
        enqueued[request_id] = time.monotonic_ns()
        sched.enqueue(COMMAND, frame, on_sent=lambda t, r=request_id: sent_at.__setitem__(r, t))
        t_next += cycle_s
    time.sleep(0.3)  # let the last commands (and, schedule off, the queue) drain
    sched.stop()
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - wall0
    wake = sorted(sched.stats.wake_error_ns)
    stats = {
        "enqueued": enqueued,
        "sent_at": sent_at,
        "scheduler_cpu_percent": 100.0 * sched.stats.cpu_s / wall,
        "process_cpu_percent": 100.0 * ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) / wall,
        "wake_error_p50_us": wake[len(wake) // 2] / 1e3 if wake else 0.0,
        "wake_error_p99_us": wake[int(len(wake) * 0.99)] / 1e3 if wake else 0.0,
        "wake_error_max_us": wake[-1] / 1e3 if wake else 0.0,
        "late_gate_events": sched.stats.late_gate_events,
        "cycles_run": sched.stats.cycles,
        "sent": sched.stats.sent,
        "queue_drops": sched.stats.queue_drops,
        "flood_offered_mbps": flood * 8 / CYCLE_US if flood else 0.0,
        "best_effort_carried_mbps": sched.stats.sent[BEST_EFFORT] * (1518 + ETHERNET_OVERHEAD_BYTES) * 8 / wall / 1e6,
        "rt": sched.rt_error or ("SCHED_FIFO %d" % args.rt if args.rt else "SCHED_OTHER"),
        "cycle_origin_ns": sched.cycle_origin_ns,
        "command_window_end_us": next(w.offset_us + w.length_us for w in gcl.windows if w.traffic_class == COMMAND),
    }
    Path(args.out).write_text(json.dumps(stats))
    return 0


def _role_modbus_device(args) -> int:
    """A pymodbus server whose write hook stamps each command's receipt (the command block's two registers
    carry the request id)."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    received: dict[int, int] = {}

    async def action(function_code, start_address, address, count, registers, values):
        if values is not None and len(values) == 2:
            received[values[0] << 16 | values[1]] = time.monotonic_ns()
        return None

    async def main():
        blocks = ([SimData(0, values=False, datatype=DataType.BITS)], [SimData(0, values=False, datatype=DataType.BITS)],
                  [SimData(256, count=8, values=0, datatype=DataType.REGISTERS)], [SimData(0, datatype=DataType.INVALID)])
        server = ModbusTcpServer([SimDevice(1, simdata=blocks, action=action)], address=(DEV_IP, MODBUS_PORT))
        await server.serve_forever(background=True)
        print("ready", flush=True)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline and args.last_id not in received:
            await asyncio.sleep(0.1)
        await server.shutdown()

    asyncio.run(main())
    Path(args.out).write_text(json.dumps({"received": received, "pcp": {}, "dropped": 0}))
    return 0


def _role_modbus_gateway(args) -> int:
    """One write of the command block per cycle at a random phase; a cycle whose previous write is still
    outstanding is skipped (and missed)."""
    from pymodbus.client import AsyncModbusTcpClient

    enqueued: dict[int, int] = {}
    rng = random.Random(1)
    origin = [0]

    async def main():
        client = AsyncModbusTcpClient(DEV_IP, port=MODBUS_PORT, timeout=1.0, retries=0)
        await client.connect()
        cycle_s = CYCLE_US / 1e6
        t_next = time.monotonic() + cycle_s
        origin[0] = int(t_next * 1e9)  # the cycle grid the commands are enqueued on
        cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        for request_id in range(1, args.cycles + 1):
            delay = t_next + rng.random() * cycle_s - time.monotonic()
            t_next += cycle_s
            if delay < 0:
                continue  # still busy with an earlier command: this cycle's is never sent
            await asyncio.sleep(delay)
            enqueued[request_id] = time.monotonic_ns()
            await client.write_registers(256, [request_id >> 16, request_id & 0xFFFF], device_id=1)
        client.close()
        cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - wall0
        return 100.0 * ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)) / wall

    cpu = asyncio.run(main())
    Path(args.out).write_text(json.dumps({"enqueued": enqueued, "process_cpu_percent": cpu,
                                          "cycle_origin_ns": origin[0]}))
    return 0


# ---- the orchestration ------------------------------------------------------------------------------------
def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _spawn(ns: str, role: str, extra: list[str]) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.tsn", "--role", role, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})


def _run_case(case: str, link, work: Path, cycles: int, key_file: Path, rt: int, grace_s: float = 20.0) -> dict:
    """Run one case; the device end gives up `grace_s` after the last cycle (a dropped last command)."""
    seconds = cycles * CYCLE_US / 1e6 + grace_s
    dev_out, gw_out = work / f"{case}-device.json", work / f"{case}-gateway.json"
    common = ["--cycles", str(cycles), "--seconds", str(seconds), "--last-id", str(cycles), "--key", str(key_file)]
    if case == "modbus_tcp":
        device = _spawn(link.dev_ns, "modbus-device", [*common, "--out", str(dev_out)])
    else:
        device = _spawn(link.dev_ns, "device", [*common, "--interface", link.dev_if, "--out", str(dev_out),
                                                "--rt", str(DEVICE_RT_PRIORITY if rt else 0)])
    ready = device.stdout.readline()
    if "ready" not in ready:
        raise RuntimeError(f"{case}: device end did not start: {device.stderr.read()[-2000:]}")
    if case == "modbus_tcp":
        gw_args = [*common, "--out", str(gw_out)]
        gateway = _spawn(link.gw_ns, "modbus-gateway", gw_args)
    else:
        gw_args = [*common, "--interface", link.gw_if, "--device-mac", link.dev_mac, "--out", str(gw_out),
                   "--rt", str(rt)]
        gw_args += ["--flood"] if "flood" in case else []
        gw_args += ["--schedule-off"] if case == "schedule_off_flood" else []
        gw_args += ["--enqueuer-not-rt"] if case == "schedule_on_flood_enqueuer_not_rt" else []
        gateway = _spawn(link.gw_ns, "gateway", gw_args)
    _, gw_err = gateway.communicate(timeout=seconds + 30)
    if gateway.returncode != 0:
        device.kill()
        raise RuntimeError(f"{case}: gateway end failed: {gw_err[-2000:]}")
    _, dev_err = device.communicate(timeout=seconds + 30)
    if device.returncode != 0:
        raise RuntimeError(f"{case}: device end failed: {dev_err[-2000:]}")
    sent = json.loads(gw_out.read_text())
    got = json.loads(dev_out.read_text())
    enqueued = {int(k): v for k, v in sent.pop("enqueued").items()}
    sent_at = {int(k): v for k, v in sent.pop("sent_at", {}).items()}
    received = {int(k): v for k, v in got["received"].items()}
    latencies = sorted((received[r] - t) / 1e3 for r, t in enqueued.items() if r in received)
    cycle_ns = CYCLE_US * 1000
    origin = sent.pop("cycle_origin_ns", 0)
    window_end_ns = int(sent.pop("command_window_end_us", 0) * 1000)

    def deadline(t: int) -> int:
        """The end of the cycle a command enqueued at t is for."""
        k, phase = divmod(t - origin, cycle_ns)
        if window_end_ns and phase >= window_end_ns - WINDOW_END_MARGIN_NS:
            k += 1  # its window has closed: it is for the next cycle's window
        return origin + (k + 1) * cycle_ns

    on_time = sum(1 for r, t in enqueued.items() if r in received and received[r] <= deadline(t))
    missed = cycles - on_time  # never sent (Modbus still busy), lost, or after the end of its cycle
    over_one_cycle = sum(1 for r, t in enqueued.items() if r not in received or received[r] - t > cycle_ns)
    in_gateway = sorted((sent_at[r] - t) / 1e3 for r, t in enqueued.items() if r in sent_at)
    on_wire = sorted((received[r] - sent_at[r]) / 1e3 for r in received if r in sent_at)
    result = {
        "p50_us": round(_percentile(latencies, 0.50), 1),
        "p99_us": round(_percentile(latencies, 0.99), 1),
        "max_us": round(latencies[-1], 1) if latencies else float("nan"),
        "missed_cycles_percent": round(100.0 * missed / cycles, 3),
        "over_one_cycle_percent": round(100.0 * (over_one_cycle + cycles - len(enqueued)) / cycles, 3),
        # the latency split: enqueue -> handed to the socket (the schedule), and socket -> device receipt
        "enqueue_to_send_p99_us": round(_percentile(in_gateway, 0.99), 1) if in_gateway else None,
        "send_to_receipt_p50_us": round(_percentile(on_wire, 0.50), 1) if on_wire else None,
        "send_to_receipt_p99_us": round(_percentile(on_wire, 0.99), 1) if on_wire else None,
        "cycles": cycles,
        "commands_received": len(latencies),
        "device_pcp_counts": got.get("pcp", {}),
        "device_security_drops": got.get("dropped", 0),
        **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in sent.items()},
    }
    return result


def machine_wakeups(cycles: int, interval_us: int, rt: int, work: Path) -> dict:
    """What this machine itself allows: cyclictest (rt-tests; C, SCHED_FIFO at `rt`, memory locked,
    one thread per CPU) sleeping `interval_us` for `cycles` periods; its wake-up lateness is a floor
    under any user-space schedule's (ours adds Python and the gateway beside it). A late wake-up of
    more than a cycle is a missed cycle for any scheduler on this machine. {"error": ...} without
    cyclictest."""
    exe = shutil.which("cyclictest")
    if exe is None:
        return {"error": "cyclictest not installed (Debian: rt-tests)"}
    hist = work / "cyclictest.hist"
    proc = subprocess.run([exe, "-m", "-p", str(rt), "-i", str(interval_us), "-l", str(cycles), "-q", "-t",
                           str(os.cpu_count() or 1), "-a", "-h", "20000", f"--histfile={hist}"],
                          capture_output=True, text=True, timeout=cycles * interval_us / 1e6 * 3 + 60)
    if proc.returncode != 0 or not hist.exists():
        return {"error": f"cyclictest exit {proc.returncode}: {proc.stderr.strip()[:200]}"}
    counts: dict[int, int] = {}
    maxima = []
    for line in hist.read_text().splitlines():
        if line[:1].isdigit():
            us, *per_cpu = (int(x) for x in line.split())
            counts[us] = counts.get(us, 0) + sum(per_cpu)
        elif line.startswith("# Max Latencies:"):
            maxima = [int(x) for x in line.split(":")[1].split()]
    total = sum(counts.values())

    def share_over(limit_us: int) -> float:
        return round(100.0 * sum(c for us, c in counts.items() if us > limit_us) / total, 3) if total else 0.0

    def percentile(q: float) -> int:
        seen = 0
        for us in sorted(counts):
            seen += counts[us]
            if seen >= q * total:
                return us
        return max(counts) if counts else 0

    return {"tool": "cyclictest", "wakeups": total, "interval_us": interval_us, "priority": rt,
            "p50_us": percentile(0.5), "p99_us": percentile(0.99), "max_us": max(maxima) if maxima else None,
            "late_over_one_cycle_percent": share_over(interval_us), "late_over_5ms_percent": share_over(5000),
            "loadavg": os.getloadavg()[0]}


def run(out: Path, json_path: Path | None, quick: bool = False, rt: int = RT_PRIORITY) -> dict:
    """Run the four cases; write tsn.md, a plot and the JSON; return the figures."""
    from bench.report import bar_plot, markdown_table, write_json
    from tsnwire.keys import generate_key_file
    from tsnwire.link import has_net_raw
    from tsnwire.netns import VethLink, ip

    if not has_net_raw():
        raise RuntimeError("cmcs bench tsn needs root (network namespaces, raw sockets)")
    cycles = QUICK_CYCLES if quick else CYCLES
    out.mkdir(parents=True, exist_ok=True)
    work = out / "tsn-work"
    work.mkdir(exist_ok=True)
    key_file = work / "bench.key"
    generate_key_file(key_file)
    figures: dict = {"cases": {}, "cycle_us": CYCLE_US, "link_rate_mbps": LINK_RATE_MBPS,
                     "flood_factor": FLOOD_FACTOR, "cpu_count": os.cpu_count(),
                     "loadavg_at_start": os.getloadavg()[0]}
    # the floor: the machine's own wake-up lateness at the cycle period (a VM's vCPU can be descheduled)
    print(f"  machine: cyclictest, {cycles:,} wake-ups of {CYCLE_US} us per CPU ...", flush=True)
    figures["machine_wakeups"] = machine_wakeups(cycles, CYCLE_US, rt, work)
    print(f"  machine: {json.dumps(figures['machine_wakeups'])}", flush=True)
    with VethLink(f"b{os.getpid() % 100000}", gw_ns_wanted=True) as link:
        ip("-n", link.gw_ns, "addr", "add", f"{GW_IP}/24", "dev", link.gw_if)
        ip("-n", link.dev_ns, "addr", "add", f"{DEV_IP}/24", "dev", link.dev_if)
        for case in CASES:
            t0 = time.monotonic()
            print(f"  {case}: {cycles:,} cycles of {CYCLE_US} us ...", flush=True)
            r = figures["cases"][case] = _run_case(case, link, work, cycles, key_file, rt)
            print(f"  {case}: p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us, max {r['max_us']:.0f} us, "
                  f"missed {r['missed_cycles_percent']:.3f} % ({time.monotonic() - t0:.0f} s)", flush=True)
    key_file.unlink(missing_ok=True)
    cases = figures["cases"]
    on, off = cases.get("schedule_on_flood"), cases.get("schedule_off_flood")
    if on is None or off is None:  # a partial run (development): no comparison
        return figures
    figures["off_on_p99_ratio"] = round(off["p99_us"] / on["p99_us"], 1) if on["p99_us"] else None
    figures["targets"] = TARGETS
    figures["targets_met"] = {
        "p99_us": on["p99_us"] < TARGETS["p99_us"], "max_us": on["max_us"] < TARGETS["max_us"],
        "missed_cycles_percent": on["missed_cycles_percent"] <= TARGETS["missed_cycles_percent"],
        "off_on_p99_ratio": (figures["off_on_p99_ratio"] or 0) >= TARGETS["off_on_p99_ratio"],
    }
    rows = [[c, cases[c]["p50_us"], cases[c]["p99_us"], cases[c]["max_us"], cases[c]["missed_cycles_percent"],
             cases[c]["over_one_cycle_percent"],
             cases[c]["commands_received"], cases[c].get("scheduler_cpu_percent", "-"),
             cases[c].get("wake_error_p99_us", "-")] for c in CASES]
    table = markdown_table(["case", "p50 us", "p99 us", "max us", "missed %", "> 1 cycle %", "received", "scheduler CPU %",
                            "wake-up error p99 us"], rows)
    bar_plot(out / "tsn_p99.png", list(CASES), [cases[c]["p99_us"] for c in CASES],
             f"Command latency p99, {CYCLE_US} us cycle", "us", targets=[TARGETS["p99_us"]] * len(CASES), log=True)
    (out / "tsn.md").write_text(
        f"# cmcs bench tsn\n\n{cycles:,} cycles per case, {CYCLE_US} us cycle, {LINK_RATE_MBPS:g} Mbit/s link "
        f"budget, flood {FLOOD_FACTOR:g}x the link. p99 off/on under flood: {figures['off_on_p99_ratio']}x.\n\n"
        f"{table}\n\nThe machine itself (cyclictest: C, SCHED_FIFO, memory locked, {CYCLE_US} us sleeps, every "
        f"CPU): {json.dumps(figures['machine_wakeups'])}. A wake-up later than a cycle is a missed cycle for "
        f"any scheduler here.\n\n![p99](tsn_p99.png)\n")
    write_json(json_path, figures)
    print(table)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tsn")
    p.add_argument("--role", choices=["device", "gateway", "modbus-device", "modbus-gateway"], required=True)
    p.add_argument("--interface")
    p.add_argument("--device-mac")
    p.add_argument("--key")
    p.add_argument("--out", required=True)
    p.add_argument("--cycles", type=int, default=CYCLES)
    p.add_argument("--seconds", type=float, default=80.0)
    p.add_argument("--last-id", type=int, default=CYCLES)
    p.add_argument("--flood", action="store_true")
    p.add_argument("--schedule-off", action="store_true")
    p.add_argument("--rt", type=int, default=0, help="SCHED_FIFO priority of the scheduler thread (0: none)")
    p.add_argument("--enqueuer-not-rt", action="store_true")
    args = p.parse_args(argv)
    gc.freeze()
    gc.disable()
    roles = {"device": _role_device, "gateway": _role_gateway, "modbus-device": _role_modbus_device,
             "modbus-gateway": _role_modbus_gateway}
    return roles[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
