#!/usr/bin/env node
// Submit a job to Rota from Node.js (amqplib) and wait for its outcome.
//
// Two ways in, as in the README's "Submitting Work from any language":
//
//   node submit.js           publish the job straight to the jobs exchange, then wait for its
//                            job.finished event
//   node submit.js --rpc     ask the scheduler to record it (RPC `submit`), wait for its
//                            job.finished event, then fetch the record (RPC `status`)
//
//   npm ci
//   ROTA_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f node submit.js --type demo.echo --payload '{"hi": 1}'
//
// Environment: ROTA_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f), ROTA_NAMESPACE
// (default rota). Exit status: 0 if the job succeeded, 1 if it ended otherwise, 2 if it could
// not be submitted or its outcome did not arrive in time.
'use strict';

const { randomUUID } = require('node:crypto');
const { parseArgs } = require('node:util');
const amqp = require('amqplib');

/** Something went wrong that the user must act on; the message says what. */
class Failure extends Error {}

async function main() {
  const args = parseArguments();
  const url = process.env.ROTA_AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';
  const ns = process.env.ROTA_NAMESPACE || 'rota';
  let payload;
  try {
    payload = JSON.parse(args.payload);
  } catch (e) {
    throw new Failure(`--payload is not JSON: ${e.message}`);
  }
  const jobId = randomUUID();
  const job = { type: args.type, uuid: jobId, payload, queue: args.queue };

  let connection;
  try {
    connection = await amqp.connect(url, {
      clientProperties: { connection_name: 'rota example submit.js (node)' },
    });
  } catch (e) {
    throw new Failure(
      `cannot connect to RabbitMQ at ${redact(url)}: ${e.message}; is it running, and is ROTA_AMQP_URL right?`,
    );
  }
  try {
    // A confirm channel: the broker acknowledges each publish once it has taken it.
    const channel = await connection.createConfirmChannel();
    channel.on('error', () => {}); // a channel error also rejects the pending call, handled there
    // Listen before submitting, so the event cannot pass by unseen: a private queue (deleted
    // with the connection) bound to every job.finished event.
    const events = await privateQueue(channel);
    try {
      await channel.bindQueue(events, `${ns}.events`, 'job.finished.#');
    } catch (e) {
      throw new Failure(
        `cannot listen to ${ns}.events (${e.message}): has Rota run on this broker with namespace ` +
          `"${ns}"? Its parts declare the exchanges when they start`,
      );
    }

    let rpc;
    if (args.rpc) {
      const user = decodeURIComponent(new URL(url).username) || 'guest';
      rpc = await Rpc.open(channel, ns, args.timeout, user);
      const record = await rpc.call({ method: 'submit', job });
      console.log(`submitted job ${jobId} (type ${args.type}) to the scheduler: ${record.state}`);
    } else {
      await publishJob(channel, ns, job);
      console.log(`published job ${jobId} (type ${args.type}) to ${ns}.jobs, queue ${args.queue}`);
    }

    const event = await waitFor(channel, events, args.timeout, (_props, msg) => msg.uuid === jobId);
    if (!event) {
      throw new Failure(
        `job ${jobId} did not finish within ${args.timeout} s; is a pool agent serving queue ` +
          `"${args.queue}" and is the scheduler running (namespace "${ns}")?`,
      );
    }
    console.log(`job ${jobId} finished: ${event.status}`);
    if (rpc) {
      const record = await rpc.call({ method: 'status', uuid: jobId });
      const last = record.attempts[record.attempts.length - 1] || {};
      console.log(`output: ${JSON.stringify(last.output)}`);
      if (last.error) console.log(`error: ${last.error.kind}: ${last.error.message}`);
    }
    return event.status === 'succeeded' ? 0 : 1;
  } finally {
    await connection.close().catch(() => {});
  }
}

// Publishes a job to the jobs exchange: persistent, confirmed, and returned by the broker if no
// queue takes it (mandatory), so a mistyped queue name is an error, not a lost job.
async function publishJob(channel, ns, job) {
  let returned = false;
  const onReturn = () => {
    returned = true;
  };
  channel.once('return', onReturn); // RabbitMQ sends the return before the confirm
  channel.publish(`${ns}.jobs`, job.queue, Buffer.from(JSON.stringify(job)), {
    contentType: 'application/json',
    persistent: true,
    messageId: job.uuid,
    mandatory: true,
  });
  try {
    await channel.waitForConfirms();
  } catch (e) {
    throw new Failure(`RabbitMQ refused the job (${e.message}); see its log`);
  }
  channel.removeListener('return', onReturn);
  if (returned) {
    throw new Failure(
      `no queue ${ns}.jobs.${job.queue} takes the job: start a pool agent that serves it ` +
        `(pool-agent run --queue ${job.queue}), or check ROTA_NAMESPACE`,
    );
  }
}

// Requests to the scheduler on its RPC queue; each reply comes to a private queue, matched by
// correlation_id.
class Rpc {
  static async open(channel, ns, timeout, user) {
    return new Rpc(channel, ns, timeout, user, await privateQueue(channel));
  }

  constructor(channel, ns, timeout, user, replies) {
    Object.assign(this, { channel, ns, timeout, user, replies });
  }

  async call(request) {
    const correlationId = randomUUID();
    this.channel.sendToQueue(`${this.ns}.rpc`, Buffer.from(JSON.stringify(request)), {
      contentType: 'application/json',
      replyTo: this.replies,
      correlationId,
      expiration: String(this.timeout * 1000), // a request nobody took in time is dropped
      userId: this.user, // who sends it: the scheduler takes requests from producers only
    });
    const reply = await waitFor(
      this.channel,
      this.replies,
      this.timeout,
      (props) => props.correlationId === correlationId,
    );
    if (!reply) {
      throw new Failure(
        `the scheduler did not answer within ${this.timeout} s on queue ${this.ns}.rpc: ` +
          `is \`scheduler run\` running with namespace "${this.ns}"?`,
      );
    }
    if (reply.reply === 'error') {
      throw new Failure(`the scheduler refused ${request.method}: ${reply.message}`);
    }
    return reply.job;
  }
}

// A queue of this connection's own, deleted with it. Not autoDelete: that would delete it
// when waitFor cancels its consumer.
async function privateQueue(channel) {
  const { queue } = await channel.assertQueue('', { exclusive: true });
  return queue;
}

// The first JSON message on `queue` for which matches(properties, message) holds, or null
// after `timeout` seconds. Others are skipped.
async function waitFor(channel, queue, timeout, matches) {
  let consumerTag;
  let timer;
  const found = await new Promise((resolve, reject) => {
    timer = setTimeout(() => resolve(null), timeout * 1000);
    channel
      .consume(
        queue,
        (msg) => {
          if (!msg) return; // the broker cancelled the consumer
          let message;
          try {
            message = JSON.parse(msg.content.toString());
          } catch {
            return;
          }
          if (matches(msg.properties, message)) resolve(message);
        },
        { noAck: true },
      )
      .then((ok) => {
        consumerTag = ok.consumerTag;
      }, reject);
  });
  clearTimeout(timer);
  if (consumerTag) await channel.cancel(consumerTag);
  return found;
}

// The URL without its password, for messages.
function redact(url) {
  return url.replace(/^(\w+:\/\/[^:/@]*):[^@]*@/, '$1:***@');
}

function parseArguments() {
  const usage =
    'usage: node submit.js [--type demo.echo] [--payload JSON] [--queue default] [--rpc] [--timeout 60]';
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        type: { type: 'string', default: 'demo.echo' },
        payload: { type: 'string', default: '{"hello": "from node"}' },
        queue: { type: 'string', default: 'default' },
        rpc: { type: 'boolean', default: false },
        timeout: { type: 'string', default: '60' },
        help: { type: 'boolean', default: false },
      },
    }));
  } catch (e) {
    throw new Failure(`${e.message}\n${usage}`);
  }
  if (values.help) {
    console.log(usage);
    process.exit(0);
  }
  const timeout = Number(values.timeout);
  if (!Number.isInteger(timeout) || timeout <= 0) {
    throw new Failure(`--timeout must be a whole number of seconds, not ${values.timeout}`);
  }
  return { ...values, timeout };
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(`submit.js: ${e instanceof Failure ? e.message : e.stack}`);
    process.exit(2);
  },
);
