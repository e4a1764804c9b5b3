"""`cmcs bench ...` dispatch."""

from __future__ import annotations

from gateway.cli import CliError

AVAILABLE = ("sim", "mission", "gateway", "tsn", "robustness")


def cli_bench(args) -> int:
    which = [args.which] if args.which != "all" else list(AVAILABLE)
    missing = [w for w in which if w not in AVAILABLE]
    if missing:
        raise CliError(f"bench {missing[0]}: not built yet; available: {', '.join(AVAILABLE)}")
    for w in which:
        print(f"cmcs bench {w} -> {args.out}/")
        if w == "sim":
            from bench import sim

            json_path = args.json if len(which) == 1 else (args.json.with_name(f"{args.json.stem}-sim.json")
                                                           if args.json else None)
            sim.run(args.out, json_path, quick=args.quick)
        elif w == "mission":
            from bench import mission

            json_path = args.json if len(which) == 1 else (args.json.with_name(f"{args.json.stem}-mission.json")
                                                           if args.json else None)
            mission.run(args.out, json_path, scenarios=getattr(args, "scenarios", None), quick=args.quick,
                        bundle=getattr(args, "bundle", None))
        elif w == "gateway":
            from bench import gateway

            json_path = args.json if len(which) == 1 else (args.json.with_name(f"{args.json.stem}-gateway.json")
                                                           if args.json else None)
            gateway.run(args.out, json_path, quick=args.quick, stress=getattr(args, "stress", "include"))
        elif w == "tsn":
            from bench import tsn

            json_path = args.json if len(which) == 1 else (args.json.with_name(f"{args.json.stem}-tsn.json")
                                                           if args.json else None)
            try:
                tsn.run(args.out, json_path, quick=args.quick)
            except RuntimeError as exc:
                raise CliError(f"bench tsn: {exc}") from None
        elif w == "robustness":
            from bench import robustness

            json_path = args.json if len(which) == 1 else (args.json.with_name(f"{args.json.stem}-robustness.json")
                                                           if args.json else None)
            robustness.run(args.out, json_path, quick=args.quick)
    return 0
