"""A whole site in one process, for the process-fault tests: simulators, gateway and built-in CMCS.

`cmcs run` without --config does the same (simulators in-process) but at plant speed 1 and on the
demo's fixed ports; the kill -9 tests need a plant and a CMCS that run faster than real time, so this
starts them the way tests/integration/test_cmcs_live.py does, as a process the test can kill:

    python -m tests.integration.fault_gateway SITE.yaml DATA_DIR SPEED [DEVICES_AFTER_S]

With DEVICES_AFTER_S the simulated devices start that long after the gateway (a restart before the
devices answer: the CMCS comes up with no fresh data). It prints "ready" once the gateway serves,
"devices up" once the simulators serve, and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from gateway.app import Gateway
from simulator.endpoints import SimulatorHost
from siteconfig.loader import load_site


async def main(site_file: str, data_dir: str, speed: float, devices_after_s: float) -> None:
    site = load_site(site_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    host = SimulatorHost(site, speed=speed)
    gateway = Gateway(site, Path(data_dir), cmcs=True, cmcs_time_scale=speed)
    if not devices_after_s:
        await host.start()
    try:
        await gateway.start()
        print("ready", flush=True)
        if devices_after_s:
            await asyncio.sleep(devices_after_s)
            await host.start()
            print(f"devices up at {time.time():.3f}", flush=True)
        await stop.wait()
    finally:
        await gateway.stop()
        await host.stop()
    print("stopped", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0))
