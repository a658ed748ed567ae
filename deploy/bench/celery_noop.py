"""The Celery side of `deploy/bench.sh compare`: Celery 5 configured as in the comparison of
issue 11 (acks_late, the rpc result backend, a no-op task), on a RabbitMQ vhost of its own
(ROTA_BENCH_CELERY_URL). The worker runs it with the prefork pool:

    celery -A celery_noop worker --pool prefork --concurrency 2
"""

import os

from celery import Celery

app = Celery(
    "rota_bench",
    broker=os.environ.get("ROTA_BENCH_CELERY_URL", "amqp://guest:guest@127.0.0.1:5672/rota-bench-celery"),
    backend="rpc://",
)
app.conf.update(
    task_acks_late=True,
    task_default_queue="rota-bench-celery",
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop():
    return None
