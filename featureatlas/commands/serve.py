"""`featureatlas serve`: serve a built site to this machine's browser, with a live probe box given a model."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from featureatlas.commands import options
from featureatlas.settings import device_setting, dictionaries_setting, model_setting, setting

NAME = "serve"


@dataclass
class ServeSettings:
    """The command's settings: the site, where its probe's model comes from, and where to listen."""

    site: Path = setting(help="a folder written by `featureatlas build`")
    store: Path | None = setting(None, "the store the site was built from: its run's model, dictionaries and dtype "
                                       "are loaded")
    model: str | None = model_setting("the model, where it is now (default: the store's run's)", default=None)
    saes: list[str] = dictionaries_setting("a dictionary folder where it is now (default: the store's recorded paths)")
    device: str = device_setting()
    port: int = setting(8000, "port to listen on")
    host: str = setting("127.0.0.1", "address to listen on; one other machines can reach needs --allow-remote")
    allow_remote: bool = setting(False, "allow a --host other machines can reach: anyone there can read the site and "
                                        "run the model (plain HTTP, no login)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(NAME, help="serve a built site on localhost, with a live probe box given a model",
                          description="Serve a built site with Python's http.server, to this machine's browser and "
                                      "the site's own pages only (a site also works from file://). With --store (or "
                                      "--model), every unit page gets a box to run your own text through the unit, "
                                      "and to list the units of its layer that fire most on it, and a box to steer "
                                      "the model with the unit; with --store, hovering a token after a top "
                                      "example's max token shows what removing the unit there does to it.")


def add_options(parser: argparse.ArgumentParser) -> None:
    options.add_settings(parser, ServeSettings, ["site", "store", "port", "host", "allow_remote"],
                         positional=["site"])
    options.add_model(parser, ServeSettings)


def run(args: argparse.Namespace) -> int:
    from featureatlas.serve.server import make_server, serve

    s = options.settings_from(args, ServeSettings)
    # a folder that is not a site, or a --host without --allow-remote, fails before the model loads
    make_server(s.site, port=0, host=s.host, allow_remote=s.allow_remote).server_close()
    prober = None
    if s.store is not None or s.model is not None:
        from featureatlas.harvest.probe import load_prober
        prober = load_prober(s.model, s.saes, store=s.store, device=s.device)
    serve(s.site, port=s.port, host=s.host, prober=prober, allow_remote=s.allow_remote)
    return 0
