"""`edgeinfer devices [list]`: list device profiles; `edgeinfer devices probe`: measure this one."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeinfer.cli.args import add_json
from edgeinfer.devices.profiles import (
    DeviceProfile,
    list_profiles,
    load_profile,
    probe,
    write_profile,
)
from edgeinfer.errors import DeviceProfileError
from edgeinfer.io.measure import DEFAULT_CHUNKS
from edgeinfer.runtime.options import RuntimeOptions
from edgeinfer.units import fmt_bytes

QUICK = dict(chunk_sizes=DEFAULT_CHUNKS, file_size=32 << 20, seconds=0.1, dram_bytes=64 << 20)
FULL = dict(chunk_sizes=DEFAULT_CHUNKS, file_size=256 << 20, seconds=0.5, dram_bytes=256 << 20)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "devices", help="list device profiles, or measure this machine",
        description="Device profiles (devices/*.toml): memory, DRAM and flash bandwidth, "
                    "execution providers. `devices` or `devices list` lists them; `devices probe` "
                    "measures this machine.")
    add_json(parser, "the profiles")
    parser.set_defaults(handler=list_command)
    sub = parser.add_subparsers(dest="devices_command", metavar="SUBCOMMAND")
    ls = sub.add_parser("list", help="list the device profiles (the same as `edgeinfer devices`)",
                        description="List the device profiles shipped in devices/*.toml.")
    add_json(ls, "the profiles")
    ls.set_defaults(handler=list_command)
    p = sub.add_parser(
        "probe", help="measure flash and DRAM bandwidth of this machine",
        description="Measure flash read bandwidth by chunk size (O_DIRECT random reads of a "
                    "temporary file in --dir, deleted afterwards) and DRAM bandwidth, print "
                    "them, and optionally write a device profile.")
    p.add_argument("-o", "--output", type=Path,
                   help="write the profile here (e.g. devices/this-machine.toml)")
    p.add_argument("--dir", type=Path, default=Path("."),
                   help="folder on the storage that will hold models (default: .)")
    p.add_argument("--quick", action="store_true",
                   help="small test file and short timings (a few seconds, noisier)")
    p.add_argument("--io-threads", type=int, default=RuntimeOptions.io_threads, metavar="N",
                   help="read threads where io_uring is unavailable (default: "
                        f"{RuntimeOptions.io_threads}, as the runtime's io_threads)")
    # Read threads spelled --threads, which means compute threads in every other subcommand.
    p.add_argument("--threads", dest="legacy_threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--name", help="profile name (default: the output file's stem, or "
                                  "this-machine)")
    add_json(p, "the profile")
    p.set_defaults(handler=probe_command)


def list_command(args: argparse.Namespace) -> int:
    profiles = [load_profile(name) for name in list_profiles()]
    if args.json:
        print(json.dumps([p.to_dict() for p in profiles], indent=2))
    else:
        print(format_table(profiles))
    return 0


def probe_command(args: argparse.Namespace) -> int:
    threads, flag = args.io_threads, "--io-threads"
    if args.legacy_threads is not None:
        print("edgeinfer: `devices probe --threads` sets read threads: spell it --io-threads", file=sys.stderr)
        threads, flag = args.legacy_threads, "--threads"
    if threads < 1:
        raise DeviceProfileError(f"{flag} (read threads) must be at least 1, got {threads}")
    name = args.name or (args.output.stem if args.output else "this-machine")
    profile = probe(args.dir, threads=threads, name=name, progress=not args.json,
                    **(QUICK if args.quick else FULL))
    if args.output:
        write_profile(profile, args.output)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
    else:
        print(format_probe(profile))
        if args.output:
            print(f"wrote {args.output}")
    return 0


def format_table(profiles: list[DeviceProfile]) -> str:
    rows = [("name", "memory", "budget", "cores", "DRAM GB/s", "flash 4K GB/s",
             "flash 1M GB/s", "providers")]
    for p in profiles:
        rows.append((
            p.name, fmt_bytes(p.memory_bytes), fmt_bytes(p.default_memory_budget), str(p.cores),
            f"{p.dram_bandwidth_gbps:.1f}", f"{p.flash_bandwidth(4 << 10):.3f}",
            f"{p.flash_bandwidth(1 << 20):.2f}",
            ",".join(x.removesuffix("ExecutionProvider") for x in p.execution_providers),
        ))
    return _render(rows)


def format_probe(p: DeviceProfile) -> str:
    rows = [("chunk", "GB/s", "MB/s", "reads/s")]
    for chunk, gbps in p.flash_read_gbps:
        rows.append((fmt_bytes(chunk), f"{gbps:.3f}", f"{gbps * 1e3:.0f}",
                     f"{gbps * 1e9 / chunk:.0f}"))
    head = (f"{p.name}: {p.cores} cores, {fmt_bytes(p.memory_bytes)} memory, DRAM "
            f"{p.dram_bandwidth_gbps:.2f} GB/s, providers "
            f"{', '.join(p.execution_providers)}\nflash reads ({p.flash_storage}):")
    return head + "\n" + _render(rows)


def _render(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

