"""What every job entry point shares: arguments, config, Ray connection and the job manifest."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from re2g.config import CONFIG_FILENAME, Re2GConfig, config_to_yaml, load_config, save_config
from re2g.errors import Re2GError
from re2g.layout import RunLayout, join


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

    try:
        cfg = load_config(args.config, preset=args.preset, overrides=args.overrides)
        connect_ray(cfg.ray)
        layout = RunLayout(cfg.run_dir)
        t0 = time.time()
        outputs = body(cfg, layout)
        manifest = {"job": name, "seconds": round(time.time() - t0, 3), "outputs": outputs,
                    "config": cfg.model_dump(mode="json")}
        import fsspec

        with fsspec.open(join(cfg.run_dir, "jobs", f"{name}.json"), "w", auto_mkdir=True) as f:
            json.dump(manifest, f, indent=2, default=str)
        if "://" not in cfg.run_dir:
            save_config(cfg, cfg.run_dir)
        else:  # s3://, gs://, file:// run directories keep their config too
            with fsspec.open(join(cfg.run_dir, CONFIG_FILENAME), "w", auto_mkdir=True) as f:
                f.write(config_to_yaml(cfg))
        print(json.dumps({"job": name, "seconds": manifest["seconds"], "outputs": outputs}, default=str))
        return 0
    except Re2GError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
