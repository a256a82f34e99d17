"""Labels fcrun puts on containers it makes for serve (state.json `labels`, `fcrun ps`)."""

APP_LABEL = "fcrun.app"  # the app an instance serves; serve's reconcile adopts or removes these
POOL_LABEL = "fcrun.pool"  # the image a pooled instance was made from (kept after a claim)
