#!/usr/bin/env python3
"""Submit a job to Rota from Python (pika) and wait for its outcome.

Two ways in, as in the README's "Submitting Work from any language":

  submit.py                 publish the job straight to the jobs exchange, then wait for its
                            job.finished event
  submit.py --rpc           ask the scheduler to record it (RPC `submit`), wait for its
                            job.finished event, then fetch the record (RPC `status`)

  pip install -r requirements.txt
  ROTA_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python3 submit.py --type demo.echo --payload '{"hi": 1}'

Environment: ROTA_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), ROTA_NAMESPACE
(default rota). Exit status: 0 if the job succeeded, 1 if it ended otherwise, 2 if it could
not be submitted or its outcome did not arrive in time.
"""

import argparse
import json
import os
import sys
import time
import uuid

import pika
import pika.exceptions


class Failure(Exception):
    """Something went wrong that the user must act on; the message says what."""


def main():
    args = parse_args()
    url = os.environ.get("ROTA_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    ns = os.environ.get("ROTA_NAMESPACE", "rota")
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as e:
        raise Failure(f"--payload is not JSON: {e}")
    job_id = str(uuid.uuid4())
    job = {"type": args.type, "uuid": job_id, "payload": payload, "queue": args.queue}

    params = pika.URLParameters(url)
    params.client_properties = {"connection_name": "rota example submit.py (python)"}
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as e:
        raise Failure(f"cannot connect to RabbitMQ at {redact(url)}: {e!r}; is it running, and is ROTA_AMQP_URL right?")
    try:
        channel = connection.channel()
        # Listen before submitting, so the event cannot pass by unseen: a private queue (deleted
        # with the connection) bound to every job.finished event.
        events = private_queue(channel)
        bind(channel, events, f"{ns}.events", "job.finished.#", ns)

        if args.rpc:
            rpc = Rpc(channel, ns, args.timeout, params.credentials.username)
            record = rpc.call({"method": "submit", "job": job})
            print(f"submitted job {job_id} (type {args.type}) to the scheduler: {record['state']}")
        else:
            publish_job(channel, ns, job)
            print(f"published job {job_id} (type {args.type}) to {ns}.jobs, queue {args.queue}")

        event = wait_for(channel, events, args.timeout, lambda props, msg: msg.get("uuid") == job_id)
        if event is None:
            raise Failure(
                f"job {job_id} did not finish within {args.timeout} s; is a pool agent serving "
                f"queue {args.queue!r} and is the scheduler running (namespace {ns!r})?")
        status = event["status"]
        print(f"job {job_id} finished: {status}")
        if args.rpc:
            record = rpc.call({"method": "status", "uuid": job_id})
            last = record["attempts"][-1] if record["attempts"] else {}
            print(f"output: {json.dumps(last.get('output'))}")
            if last.get("error"):
                print(f"error: {last['error']['kind']}: {last['error']['message']}")
        return 0 if status == "succeeded" else 1
    finally:
        if connection.is_open:
            connection.close()


def publish_job(channel, ns, job):
    """Publishes a job to the jobs exchange: persistent, confirmed, and refused by the broker
    if no queue takes it (mandatory), so a mistyped queue name is an error, not a lost job."""
    channel.confirm_delivery()
    props = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=job["uuid"],
    )
    try:
        channel.basic_publish(f"{ns}.jobs", job["queue"], json.dumps(job), props, mandatory=True)
    except pika.exceptions.UnroutableError:
        raise Failure(
            f"no queue {ns}.jobs.{job['queue']} takes the job: start a pool agent that serves "
            f"it (pool-agent run --queue {job['queue']}), or check ROTA_NAMESPACE")
    except pika.exceptions.NackError:
        raise Failure("RabbitMQ refused the job (nack); see its log")


class Rpc:
    """Requests to the scheduler on its RPC queue; each reply comes to a private queue, matched
    by correlation_id."""

    def __init__(self, channel, ns, timeout, user):
        self.channel, self.ns, self.timeout, self.user = channel, ns, timeout, user
        self.replies = private_queue(channel)

    def call(self, request):
        correlation = str(uuid.uuid4())
        props = pika.BasicProperties(
            content_type="application/json",
            reply_to=self.replies,
            correlation_id=correlation,
            expiration=str(self.timeout * 1000),  # a request nobody took in time is dropped
            user_id=self.user,  # who sends it: the scheduler takes requests from producers only
        )
        self.channel.basic_publish("", f"{self.ns}.rpc", json.dumps(request), props)
        reply = wait_for(self.channel, self.replies, self.timeout,
                         lambda p, _msg: p.correlation_id == correlation)
        if reply is None:
            raise Failure(
                f"the scheduler did not answer within {self.timeout} s on queue {self.ns}.rpc: "
                f"is `scheduler run` running with namespace {self.ns!r}?")
        if reply["reply"] == "error":
            raise Failure(f"the scheduler refused {request['method']}: {reply['message']}")
        return reply["job"]


def private_queue(channel):
    """A queue of this connection's own, deleted with it. Not auto-delete: that would delete
    it when wait_for cancels its consumer."""
    return channel.queue_declare("", exclusive=True).method.queue


def bind(channel, queue, exchange, key, ns):
    try:
        channel.queue_bind(queue, exchange, routing_key=key)
    except pika.exceptions.ChannelClosedByBroker as e:
        raise Failure(
            f"cannot listen to {exchange} ({e.reply_text}): has Rota run on this broker with "
            f"namespace {ns!r}? Its parts declare the exchanges when they start")


def wait_for(channel, queue, timeout, matches):
    """The first JSON message on `queue` for which matches(properties, message) holds, or None
    after `timeout` seconds. Others are skipped."""
    found = []

    def on_message(_channel, _method, props, body):
        try:
            message = json.loads(body)
        except ValueError:
            return
        if not found and matches(props, message):
            found.append(message)

    tag = channel.basic_consume(queue, on_message, auto_ack=True)
    deadline = time.monotonic() + timeout
    while not found and time.monotonic() < deadline:
        channel.connection.process_data_events(time_limit=max(0.0, min(1.0, deadline - time.monotonic())))
    channel.basic_cancel(tag)
    return found[0] if found else None


def redact(url):
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{host}"
    return url


def parse_args():
    p = argparse.ArgumentParser(description="Submit a job to Rota and wait for its outcome.")
    p.add_argument("--type", default="demo.echo", help="the work type (default demo.echo)")
    p.add_argument("--payload", default='{"hello": "from python"}', help="the payload, as JSON")
    p.add_argument("--queue", default="default", help="the jobs queue (default: default)")
    p.add_argument("--rpc", action="store_true",
                   help="submit through the scheduler (RPC submit, then status) instead of publishing")
    p.add_argument("--timeout", type=int, default=60, help="seconds to wait for the outcome (default 60)")
    return p.parse_args()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as e:
        print(f"submit.py: {e}", file=sys.stderr)
        sys.exit(2)
