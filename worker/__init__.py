"""The Celery application: `celery -A worker worker|beat|flower`.

Celery's `-A worker` finds `app` here; the tasks register on import of worker.tasks.
"""
from common.messaging import make_celery
from common.settings import get_settings

app = make_celery(get_settings())

import worker.tasks  # noqa: E402,F401  (registers the tasks on `app`)
import worker.webhooks  # noqa: E402,F401  (the webhook tasks)
