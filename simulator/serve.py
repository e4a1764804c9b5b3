"""`cmcs simulate`: the site's device simulators as real Modbus TCP (and TSN, --tsn-interface) endpoints.

Bad input (site file, scenario file, speed, a port that cannot be bound) is one line on
stderr and exit code 2; heavy modules are imported only once the arguments are sound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

EXIT_BAD_INPUT = 2


class _BadInput(Exception):
    """An expected failure: its message is the one line the user sees."""


def cli_simulate(args: argparse.Namespace) -> int:
    """Serve (or with --list, list) every device of the site; runs until SIGINT/SIGTERM."""
    try:
        site = _load_site(getattr(args, "config", None))
        _check_profiles(site)
        if getattr(args, "list", False):
            try:
                _print_list(site)
            except BrokenPipeError:  # `cmcs simulate --list | head`: not an error
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
            return 0
        speed = float(getattr(args, "speed", 1.0))
        if not speed > 0:
            raise _BadInput(f"--speed must be > 0, got {speed:g}")
        scenario = _load_scenario(getattr(args, "scenario", None), site)
        seed = getattr(args, "seed", None)
        if seed is None and scenario is None:
            seed = 0  # a quiet day, seed 0; with a scenario, its own seed unless one is given
        tsn_interface = getattr(args, "tsn_interface", None)
        tsn_devices = [name for name, _, e in site.devices() if e.driver == "tsn"]
        if tsn_devices and not tsn_interface:
            raise _BadInput(f"the site has {len(tsn_devices)} driver tsn device(s) ({tsn_devices[0]} ...): give "
                            f"--tsn-interface, the device end of the TSN link")
        return asyncio.run(_serve(site, scenario, speed, seed, tsn_interface))
    except _BadInput as exc:
        print(f"cmcs simulate: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _first_lines(exc: Exception) -> str:
    """One line for a loader error that may list several problems."""
    lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    more = f" (and {len(lines) - 1} more problem{'s' if len(lines) > 2 else ''})" if len(lines) > 1 else ""
    return lines[0] + more


def _load_site(path):
    """The site from --config, or the built-in demo site."""
    from siteconfig.yamlpos import ConfigError, ConfigErrors

    try:
        if path is None:
            from siteconfig.demo import demo_site

            return demo_site()
        from siteconfig.loader import load_site

        return load_site(path)
    except (ConfigError, ConfigErrors, OSError, ValueError) as exc:
        raise _BadInput(_first_lines(exc)) from None


def _check_profiles(site) -> None:
    """Load and validate every register-map profile the site names."""
    from siteconfig.profiles import load_profile
    from siteconfig.yamlpos import ConfigError, ConfigErrors

    profiles = {}
    for name, kind, endpoint in site.devices():
        try:
            profile = profiles.get(endpoint.profile) or load_profile(endpoint.profile)
        except (ConfigError, ConfigErrors) as exc:
            raise _BadInput(f"{name}: {_first_lines(exc)}") from None
        if profile.device_kind != kind:
            raise _BadInput(f"{name}: profile {profile.name} describes a {profile.device_kind}, not a {kind}")
        profiles[endpoint.profile] = profile


def _print_list(site) -> None:
    """One aligned line per device: name, host, port, unit id, profile."""
    rows = [(name, e.host, str(e.port), str(e.unit_id), e.profile) for name, _, e in site.devices()]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(5)]
    for r in rows:
        # numbers right-aligned, text left-aligned
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]), r[3].rjust(widths[3]), r[4]]
        print("  ".join(cells))


def _load_scenario(path, site):
    """The scenario from --scenario (fault targets checked against the site), or None (a quiet day)."""
    if path is None:
        return None
    from simulator.scenario import load_scenario
    from siteconfig.yamlpos import ConfigError, ConfigErrors

    try:
        return load_scenario(path, site)
    except (ConfigError, ConfigErrors, OSError, ValueError) as exc:
        raise _BadInput(_first_lines(exc)) from None


async def _serve(site, scenario, speed: float, seed: int | None, tsn_interface: str | None = None) -> int:
    from simulator.endpoints import EndpointError, SimulatorHost

    try:
        host = SimulatorHost(site, scenario=scenario, seed=seed, speed=speed, tsn_interface=tsn_interface)
    except ValueError as exc:  # e.g. a scenario naming a device the site does not have
        raise _BadInput(str(exc)) from None
    try:
        await host.start()
    except EndpointError as exc:
        raise _BadInput(str(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"cmcs simulate: serving {host.describe()}; Ctrl-C to stop", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await host.stop()
    print(f"cmcs simulate: stopped at plant time {host.plant.t_s:.1f} s", flush=True)
    return 0
