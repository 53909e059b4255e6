"""What every job entry point shares: arguments, config, Ray connection and the job manifest."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from re2g.artifacts import write_json_atomic
from re2g.config import Re2GConfig, load_config, save_config
from re2g.errors import Re2GError
from re2g.layout import RunLayout


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every job takes (``--config``, ``--preset``, ``--set``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", "-c", help="YAML config (preset + file + --set overrides)")
    p.add_argument("--preset", choices=["tiny", "paper"], help="preset to start from")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set index.num_shards=8 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p


def run_job(name: str, args: argparse.Namespace, body: Callable[[Re2GConfig, RunLayout], dict]) -> int:
    """Load the config, connect to Ray (``RAY_ADDRESS`` or ``ray.address``; a local Ray otherwise),
    run ``body`` and write ``RUN_DIR/jobs/<name>.json`` with the config, outputs and seconds.
    Bad input exits with code 2 and a one-line reason."""
    from re2g.runtime import connect_ray
    from re2g.storage import RunDirMirror, is_remote, to_local_path

    try:
        cfg = load_config(args.config, preset=args.preset, overrides=args.overrides)
        connect_ray(cfg.ray)
        # A remote run directory (s3://, gs://, ...) is worked on through a local mirror: pulled
        # first, pushed at the end (commit markers last). file:// is a local path.
        remote = cfg.run_dir
        mirror = RunDirMirror(remote) if is_remote(remote) else None
        localize = mirror.localize if mirror else to_local_path
        if mirror:
            mirror.pull()
        for k, v in vars(args).items():  # paths given on the command line under the run directory
            if isinstance(v, str) and k not in ("config", "preset"):
                setattr(args, k, localize(v))
        cfg = cfg.model_copy(update={"run_dir": localize(remote)})
        layout = RunLayout(cfg.run_dir)
        t0 = time.time()
        outputs = body(cfg, layout)
        manifest = {"job": name, "seconds": round(time.time() - t0, 3), "outputs": outputs,
                    "config": cfg.model_dump(mode="json") | {"run_dir": remote}}
        write_json_atomic(Path(cfg.run_dir, "jobs", f"{name}.json"), manifest, default=str)
        save_config(cfg.model_copy(update={"run_dir": remote}), cfg.run_dir)
        if mirror:
            mirror.push()
        print(json.dumps({"job": name, "seconds": manifest["seconds"], "outputs": outputs}, default=str))
        return 0
    except Re2GError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
