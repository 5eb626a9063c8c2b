"""What the broker, the spawner and the node agent must agree on, defined once (standard library only).

An image carries one agent for years while the hub side is upgraded under it, so everything the
two ends of an agent's connection say to each other is named here and nowhere else:

- how the agent finds and logs in to the broker: the job environment the spawner sets
  (:data:`JOB_ENV`), the enrolment password (:data:`ENROL_PREFIX`), the ciphers both sides offer
  (:data:`ENCRYPTION_ALGS`);
- the channels on the connection: the control channel's pseudo-destination
  (:data:`CONTROL_HOST`, :data:`CONTROL_PORT`) and the SSH channel parameters both sides advertise
  (:data:`CHANNEL_WINDOW`, :data:`CHANNEL_MAX_PKTSIZE`);
- the control messages (newline-delimited JSON objects with a ``type``; see :class:`Msg`) and the
  protocol version the agent announces in ``hello`` (:data:`PROTOCOL_VERSION`; the broker's
  answer to versions it cannot serve is :func:`protocol_refusal`);
- the line ``node-agent launch`` prints when maintenance refuses a job, which the spawner reads
  from the job's output (:data:`MAINTENANCE_PREFIX`).

Protocol versions (the number goes up whenever an agent of the previous version would
misunderstand the broker, or the broker the agent; the broker accepts the current version and the
previous one, so images built for the hub before an upgrade keep working):

- **1**: ``hello`` carries ``protocol``; messages ``hello``, ``ready``, ``heartbeat``,
  ``walltime``, ``exit`` (agent to broker) and ``ack`` (broker to agent, informational).
- **2**: the broker answers a ``hello`` it cannot serve with ``refused`` (a ``message`` for the
  user) and closes the session; the agent waits for the ``hello``'s ``ack`` (or ``refused``)
  before it goes on, and stops for good on ``refused``.
"""

from __future__ import annotations

#: The protocol version this side speaks (announced by the agent in ``hello``).
PROTOCOL_VERSION = 2
#: The oldest agent protocol the broker still accepts: the previous version.
OLDEST_PROTOCOL = PROTOCOL_VERSION - 1

#: The pseudo-destination of the agent's control channel (a direct-tcpip channel that the
#: broker serves itself; never a network connection). ``.invalid`` cannot resolve.
CONTROL_HOST = "control.broker.invalid"
CONTROL_PORT = 1

#: The enrolment password is ``"enrol <one-time secret> <agent public key, OpenSSH format>"``.
ENROL_PREFIX = "enrol "

#: Ciphers both sides offer, best first: AES-GCM costs about half the CPU of chacha20-poly1305.
ENCRYPTION_ALGS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")

#: SSH channel parameters each side advertises for the channels it receives on (the broker: the
#: forwarded-tcpip channels it opens, agent -> hub; the agent: the ones it accepts, hub ->
#: notebook). asyncssh's defaults, named so both sides and the benchmarks change them together.
CHANNEL_WINDOW = 2 * 1024 * 1024
CHANNEL_MAX_PKTSIZE = 32768

#: The job environment the spawner sets for the agent. The agent passes none of them on to the
#: notebook server, and removes the secret from its own environment as soon as it is read.
ENV_SSH_HOST = "BROKER_SSH_HOST"  # the broker's SSH address
ENV_SSH_PORT = "BROKER_SSH_PORT"  # the broker's SSH port
ENV_HOST_KEY = "BROKER_HOST_KEY"  # the broker's public host key (OpenSSH format): pinned
ENV_SESSION_ID = "BROKER_SESSION_ID"  # the session the job serves (the SSH user name)
ENV_ENROL_SECRET = "BROKER_ENROL_SECRET"  # the one-time enrolment secret
JOB_ENV = (ENV_SSH_HOST, ENV_SSH_PORT, ENV_HOST_KEY, ENV_SESSION_ID, ENV_ENROL_SECRET)

#: ``node-agent launch`` prints this, then the admins' message, on stderr when maintenance mode
#: refuses the job; the spawner shows the message on the spawn page.
MAINTENANCE_PREFIX = "NODE-AGENT-MAINTENANCE: "


class Msg:
    """The control messages' ``type`` values."""

    # agent -> broker
    HELLO = "hello"  # {"protocol": int, "node": str, "job_id": str, "pid": int}; first on each connection
    READY = "ready"  # the server answers
    HEARTBEAT = "heartbeat"
    WALLTIME = "walltime"  # {"message": str}: the job is close to its time limit
    EXIT = "exit"  # {"status": int}: the server exited
    # broker -> agent
    ACK = "ack"  # {"of": type}: hello, ready, walltime, exit were handled
    REFUSED = "refused"  # {"message": str}: the broker cannot serve this agent; the session is closed


def protocol_refusal(announced: object) -> str | None:
    """Why the broker cannot serve an agent announcing protocol *announced* (None: it can).

    The message is for the person whose spawn failed (the spawn page and the job's output), and
    says which side needs the upgrade.
    """
    accepts = f"accepts {OLDEST_PROTOCOL}\u2013{PROTOCOL_VERSION}"
    if isinstance(announced, bool) or not isinstance(announced, int):
        return f"the agent announced no protocol version; this broker {accepts}: rebuild the image"
    if announced < OLDEST_PROTOCOL:
        return f"agent protocol {announced} is too old for this broker ({accepts}): rebuild the image"
    if announced > PROTOCOL_VERSION:
        return f"agent protocol {announced} is too new for this broker ({accepts}): upgrade the hub"
    return None
