"""The leanfed Flower ServerApp: parse the run config once, run and record the strategy."""

from __future__ import annotations

import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.security.signing import signer_from
from server.session import run_recorded
from server.store import RunStore, resolve_db_url
from tasks.config import LeanfedConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config before round 1, then run it against whatever Grid Flower gives us."""
    cfg = LeanfedConfig.from_run_config(dict(context.run_config))
    # The database URL and the signing key (LEANFED_SIGNING_KEY) come from the SuperLink
    # host's environment, never the run config: neither may enter the store.
    signer = signer_from(None)
    with RunStore(resolve_db_url(os.environ.get("LEANFED_DB_URL"))) as store:
        run_recorded(grid, cfg, store, signer=signer, flower_run_id=context.run_id)
