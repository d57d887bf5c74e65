<?php
/*
 * apm_module.php: the PHP connector of apm (connector protocol version 1).
 *
 * One drop-in file for PHP 7.4+ CLI, with nothing beyond a stock Debian
 * `php-cli` (json and pcre, which every PHP build has):
 *
 *     require_once __DIR__ . '/apm_module.php';
 *     $apm = new ApmModule(function (ApmSession $s) {
 *         $s->write('Hello World', ['x-status' => '200', 'content-type' => 'text/plain']);
 *         $s->close();
 *     });
 *     $apm->run();
 *
 * apm owns the client's socket and hands each HTTP request, WebSocket or TCP
 * connection to the app as a session, over the descriptor named by APM_FD
 * (docs/connector-protocol.md is the contract). The loop is single-threaded:
 * callbacks run one at a time, and sessions may only be used from them.
 * IPC with other workers (`listen` in their config): $apm->send($ch, $d),
 * $apm->request($ch, $d, $timeout_ms) (blocks the app, not the loop),
 * $apm->requestStream($ch, $head, $timeout_ms) (an ApmStream or null),
 * $apm->onChannel = function ($ch, $d, $reply) {...}, $apm->onStream =
 * function (ApmStream $s) {...}, $apm->setDashValue($id, $value, $color)
 * and $apm->metric($name, $value, 'counter'|'gauge'|'timing').
 * PHP cannot mark the inherited descriptor close-on-exec: a process the app
 * starts (proc_open, exec) sees it and must leave it alone.
 */

final class ApmModule
{
    const PROTOCOL = 1;

    const HELLO = 1;
    const READY = 2;
    const OPEN = 16;
    const DATA = 17;
    const TEXT = 18;
    const MORE = 19;
    const END = 20;
    const HEAD = 21;
    const RAW = 22;
    const CLOSE = 23;
    const CREDIT = 24;
    // Session hand-off (feature "migrate").
    const SAVE = 48;
    const MIGRATE = 49;
    const HANDED = 50;

    // Until `hello` announces them, the version 1 values bound frames.
    const DEFAULT_MAX_FRAME = 1048576;
    const DEFAULT_WINDOW = 262144;
    const DEFAULT_SESSION_DATA_MAX = 65536;
    const READ_SIZE = 262144;

    /** @var string|null the worker's name, from apm's hello */
    public $worker;
    /** @var int|null this instance's id, from apm's hello */
    public $instance_id;
    /** @var callable|null function (ApmSession $s) */
    public $on_connect;

    /** @internal */ public $maxFrame = self::DEFAULT_MAX_FRAME;
    /** @internal */ public $window = self::DEFAULT_WINDOW;
    /** @internal */ public $sessionDataMax = self::DEFAULT_SESSION_DATA_MAX;
    /** @internal */ public $sessions = [];

    private $channel;
    private $readySent = false;
    private $inbuf = '';
    private $inpos = 0;
    private $out = '';

    public function __construct(callable $on_connect = null)
    {
        $this->on_connect = $on_connect;
        if (getenv('APM') !== '1') {
            self::fatal('start this app with apm run (APM is not set)');
        }
        $fd = getenv('APM_FD');
        if ($fd === false || $fd === '') {
            self::fatal('this worker has no connector channel: give it server lines '
                . 'and upstream connector (APM_FD is not set)');
        }
        if (!ctype_digit($fd)) {
            self::fatal("APM_FD=$fd is not a usable channel: not a descriptor number");
        }
        $channel = @fopen("php://fd/$fd", 'r+b');
        if ($channel === false) {
            $error = error_get_last();
            self::fatal("APM_FD=$fd is not a usable channel: " . ($error ? $error['message'] : 'cannot open it'));
        }
        // Reads and writes go straight to the socket, never through PHP's buffers.
        stream_set_read_buffer($channel, 0);
        stream_set_write_buffer($channel, 0);
        if (function_exists('pcntl_signal')) {
            // A write to a daemon that went away is an error to handle, not
            // a signal. Caught rather than ignored: programs the app
            // executes get the default disposition back.
            pcntl_signal(SIGPIPE, function () {
            });
        }
        $this->channel = $channel;
        $this->handshake();
    }

    /** @internal */
    public static function fatal(string $message)
    {
        fwrite(STDERR, "apm_module: $message\n");
        exit(1);
    }

    private static function protocolError(string $why)
    {
        self::fatal("protocol error from apm: $why");
    }

    private function handshake()
    {
        // apm writes hello as soon as the process starts, so blocking here is
        // short; it makes instance_id available before run().
        $length = unpack('N', $this->readExact(4))[1];
        if ($length < 5 || $length > 5 + $this->maxFrame) {
            self::protocolError(sprintf('a frame of %d bytes (the limit is %d)', $length, 5 + $this->maxFrame));
        }
        $body = $this->readExact($length);
        $prefix = unpack('Ckind/Nsession', $body);
        if ($prefix['kind'] !== self::HELLO || $prefix['session'] !== 0) {
            self::protocolError(sprintf('the first frame is kind %d, not hello', $prefix['kind']));
        }
        $hello = json_decode(substr($body, 5), true);
        if (!is_array($hello) || !array_key_exists('protocol', $hello)) {
            self::protocolError('hello is not a JSON object with a protocol');
        }
        if ($hello['protocol'] !== self::PROTOCOL) {
            self::fatal(sprintf('this connector speaks protocol %d, apm speaks %s; update apm_module',
                self::PROTOCOL, json_encode($hello['protocol'])));
        }
        $this->worker = $hello['worker'] ?? null;
        $this->instance_id = $hello['instance_id'] ?? null;
        $this->maxFrame = (int)($hello['max_frame'] ?? self::DEFAULT_MAX_FRAME);
        $this->window = (int)($hello['window'] ?? self::DEFAULT_WINDOW);
        $this->sessionDataMax = (int)($hello['session_data_max'] ?? self::DEFAULT_SESSION_DATA_MAX);
    }

    private function readExact(int $size): string
    {
        $data = '';
        while (strlen($data) < $size) {
            $chunk = fread($this->channel, $size - strlen($data));
            if ($chunk === false || $chunk === '') {
                exit(0); // apm closed the channel before greeting
            }
            $data .= $chunk;
        }
        return $data;
    }

    /**
     * Serve sessions (and IPC) until apm closes the channel. Does not
     * return. A worker without server lines may run without a handler.
     */
    public function run()
    {
        $this->ensureReady();
        while (true) {
            $this->pumpOnce(null);
        }
    }

    /** Says `ready` once: from run(), or from the first IPC call before it. */
    private function ensureReady()
    {
        if ($this->readySent) {
            return;
        }
        $this->readySent = true;
        $ready = [
            'protocol' => self::PROTOCOL,
            'connector' => 'php ' . PHP_VERSION,
            'half_close' => true,
            'features' => ['migrate', 'ipc'],
        ];
        $this->sendFrame(self::READY, 0, json_encode($ready));
        stream_set_blocking($this->channel, false);
    }

    /**
     * One turn of the loop: flush, wait up to $timeout seconds (null: until
     * something happens) and handle what arrived.
     */
    private function pumpOnce($timeout)
    {
        $this->flush();
        $read = [$this->channel];
        $write = $this->out === '' ? null : [$this->channel];
        $except = null;
        $seconds = $timeout === null ? null : (int)$timeout;
        $micro = $timeout === null ? null : (int)(($timeout - (int)$timeout) * 1e6);
        $ready = @stream_select($read, $write, $except, $seconds, $micro);
        if ($ready === false) {
            return; // interrupted by a signal
        }
        if ($read) {
            $this->readAvailable();
        }
    }

    // The channel.

    /** @internal */
    public function sendFrame(int $kind, int $session, string $payload)
    {
        $this->out .= pack('NCN', 5 + strlen($payload), $kind, $session) . $payload;
    }

    private function flush()
    {
        while ($this->out !== '') {
            $sent = @fwrite($this->channel, $this->out);
            if ($sent === false) {
                exit(0); // apm is gone; it restarts or stops us anyway
            }
            if ($sent === 0) {
                return;
            }
            $this->out = (string)substr($this->out, $sent);
        }
    }

    private function readAvailable()
    {
        $chunk = @fread($this->channel, self::READ_SIZE);
        if ($chunk === false || ($chunk === '' && feof($this->channel))) {
            exit(0); // apm closed the channel: it is stopping this instance
        }
        if ($chunk === '') {
            return;
        }
        $this->inbuf .= $chunk;
        $this->parse();
    }

    private function parse()
    {
        // The position lives in the module: a callback may pump the loop
        // (IPC) and parse the frames after its own.
        while (true) {
            $buf = $this->inbuf;
            $pos = $this->inpos;
            if (strlen($buf) - $pos < 4) {
                break;
            }
            $length = unpack('N', $buf, $pos)[1];
            // Checked before waiting for the rest: a bad length must not make
            // us buffer gigabytes.
            if ($length < 5 || $length > 5 + $this->maxFrame) {
                self::protocolError(sprintf('a frame of %d bytes (the limit is %d)', $length, 5 + $this->maxFrame));
            }
            if (strlen($buf) - $pos - 4 < $length) {
                break;
            }
            $kind = ord($buf[$pos + 4]);
            $session = unpack('N', $buf, $pos + 5)[1];
            $payload = (string)substr($buf, $pos + 9, $length - 5);
            $this->inpos = $pos + 4 + $length;
            unset($buf); // so that a nested read appends without copying
            $this->dispatch($kind, $session, $payload);
        }
        if ($this->inpos > 0) {
            $this->inbuf = (string)substr($this->inbuf, $this->inpos);
            $this->inpos = 0;
        }
    }

    private function dispatch(int $kind, int $sessionId, string $payload)
    {
        switch ($kind) {
            case self::OPEN:
            case self::DATA:
            case self::TEXT:
            case self::MORE:
            case self::END:
            case self::CLOSE:
            case self::CREDIT:
            case self::MIGRATE:
                break;
            case self::IPC_MESSAGE:
            case self::IPC_RESULT:
            case self::STREAM_OFFER:
            case self::STREAM_JOIN:
            case self::STREAM_DATA:
            case self::STREAM_CLOSE:
                $this->dispatchIpc($kind, $sessionId, $payload);
                return;
            default:
                self::protocolError("kind $kind is not for a connector to receive");
        }
        if ($sessionId === 0) {
            self::protocolError("kind $kind on the channel instead of a session");
        }
        if ($kind === self::OPEN) {
            $this->openSession($sessionId, $payload);
            return;
        }
        $session = $this->sessions[$sessionId] ?? null;
        if ($session === null) {
            return; // it ended; frames may cross a close on the wire
        }
        switch ($kind) {
            case self::CREDIT:
                if (strlen($payload) !== 4) {
                    self::protocolError(sprintf('a credit of %d bytes', strlen($payload)));
                }
                $session->credit += unpack('N', $payload)[1];
                $session->pump();
                return;
            case self::CLOSE:
                if (strlen($payload) === 1) {
                    self::protocolError('a close of one byte');
                }
                $code = $payload === '' ? 0 : unpack('n', $payload)[1];
                $reason = (string)substr($payload, 2);
                $appClosed = $session->closing;
                $session->forget();
                if (!$appClosed) {
                    $this->call($session, 'on_close', [$code, $reason]);
                }
                return;
            case self::END:
                if ($session->closing) {
                    return;
                }
                if ($session->on_end === null && $session->protocol === 'tcp') {
                    // As a socket that does not allow half-open connections:
                    // the client is done, so is the session, once its answer is out.
                    $session->close();
                } else {
                    $this->call($session, 'on_end', []);
                }
                return;
            case self::MIGRATE:
                $session->handOff();
                return;
            default:
                $this->receive($session, $kind, $payload);
        }
    }

    private function openSession(int $sessionId, string $payload)
    {
        if (isset($this->sessions[$sessionId])) {
            self::protocolError("open for session $sessionId, which is open");
        }
        $head = json_decode($payload, true);
        if (!is_array($head)) {
            self::protocolError('open is not a JSON object');
        }
        $session = new ApmSession($this, $sessionId, $head);
        $this->sessions[$sessionId] = $session;
        if ($this->on_connect === null) {
            fwrite(STDERR, "apm_module: session $sessionId: the app gave ApmModule no session handler\n");
            $session->failed();
            return;
        }
        $this->call($session, null, [$session]);
    }

    private function receive(ApmSession $session, int $kind, string $payload)
    {
        $size = strlen($payload);
        $session->allowance -= $size;
        if ($session->allowance < 0) {
            self::protocolError("session {$session->session_id}: data beyond the window");
        }
        if ($session->closing) {
            return; // the app has answered; nobody wants the rest
        }
        if ($session->protocol === 'ws') {
            if ($kind === self::MORE) {
                // apm sends the rest of a big message only as credit comes
                // back, so fragments are credited as soon as they are buffered.
                $session->partial .= $payload;
                $this->giveCredit($session, $size);
                return;
            }
            $message = $payload;
            if ($session->partial !== '') {
                $message = $session->partial . $payload;
                $session->partial = '';
            }
            if ($kind === self::TEXT && !preg_match('//u', $message)) {
                self::protocolError("session {$session->session_id}: a text message that is not UTF-8");
            }
            $this->call($session, 'on_data', [$message, $kind === self::DATA]);
        } else {
            // A byte stream: `more` fragments are just bytes, passed on as they come.
            $this->call($session, 'on_data', [$payload, true]);
        }
        // Consumed once the app's callback has returned.
        $this->giveCredit($session, $size);
    }

    private function giveCredit(ApmSession $session, int $size)
    {
        if ($size > 0 && $session->open) {
            $session->allowance += $size;
            $this->sendFrame(self::CREDIT, $session->session_id, pack('N', $size));
        }
    }

    /** Calls the app's handler (null) or one of the session's callbacks. */
    private function call(ApmSession $session, $callback, array $args)
    {
        $function = $callback === null ? $this->on_connect : $session->$callback;
        if ($function === null) {
            return;
        }
        try {
            $function(...$args);
        } catch (Throwable $e) {
            // The app's bug ends its session, not the instance.
            fwrite(STDERR, sprintf("apm_module: session %d: uncaught exception in %s: %s\n",
                $session->session_id, $callback ?? 'the session handler', $e));
            $session->failed();
        }
    }

    // ---- IPC between workers (feature "ipc", kinds 32-47; docs/connector-protocol.md) ----

    const IPC_SEND = 32;
    const IPC_REQUEST = 33;
    const IPC_MESSAGE = 34;
    const IPC_REPLY = 35;
    const IPC_RESULT = 36;
    const STREAM_OPEN = 37;
    const STREAM_OFFER = 38;
    const STREAM_ACCEPT = 39;
    const STREAM_JOIN = 40;
    const STREAM_DATA = 41;
    const STREAM_CLOSE = 42;
    const DASH = 43;
    const METRIC = 44;
    // Ids this side picks; apm's have the high bit set.
    const MAX_OWN_ID = 0x7fffffff;

    /**
     * @var callable|null function (string $channel, $data, ?callable $reply):
     * a message on a channel the worker listens on; what it returns (not
     * null) answers a request it did not reply to
     */
    public $onChannel;
    /** @var callable|null function (ApmStream $s): a stream offered on such a channel; $s->accept() takes it */
    public $onStream;

    /** @internal */ public $streams = [];
    private $lastOwnId = 0;
    private $results = [];   // request id => data, once the result came
    private $waiting = [];   // request ids without a result yet

    /** Broadcasts $data (any JSON value) to every process listening on $channel. */
    public function send(string $channel, $data = null)
    {
        $this->sendJson(self::IPC_SEND, 0, ['channel' => $channel, 'data' => $data]);
    }

    /**
     * Sends $data to the listeners of $channel and returns the first reply's
     * data, or null (no listener, timeout, none replied). $timeout_ms: this
     * call's timeout, else the worker's ipc_timeout, else 500 ms. The loop
     * keeps serving meanwhile: callbacks of other sessions run.
     */
    public function request(string $channel, $data = null, $timeout_ms = null)
    {
        $id = $this->ownId();
        $this->sendJson(self::IPC_REQUEST, $id, ['channel' => $channel, 'data' => $data,
            'timeout_ms' => $timeout_ms === null ? null : (int)$timeout_ms]);
        $this->waiting[$id] = true;
        while (!array_key_exists($id, $this->results)) {
            $this->pumpOnce(null);
        }
        $result = $this->results[$id];
        unset($this->results[$id]);
        return $result;
    }

    /**
     * Opens a stream on $channel, $head for the listeners to judge it, and
     * returns it once the first peer joined, or null when none did (no
     * listener, all declined, timeout). Pumps the loop as request() does.
     */
    public function requestStream(string $channel, $head = null, $timeout_ms = null)
    {
        $id = $this->ownId();
        $stream = new ApmStream($this, $id, $channel, $head, null);
        $this->sendJson(self::STREAM_OPEN, $id, ['channel' => $channel, 'head' => $head,
            'timeout_ms' => $timeout_ms === null ? null : (int)$timeout_ms]);
        $this->streams[$id] = $stream;
        while ($stream->open && !$stream->joined) {
            $this->pumpOnce(null);
        }
        return $stream->joined ? $stream : null;
    }

    /** A value for the dashboard's panel $id (any JSON value, a color such as '#4f8cff'). */
    public function setDashValue($id, $value, $color = null)
    {
        $this->sendJson(self::DASH, 0, ['id' => $id, 'value' => $value, 'color' => $color === null ? null : (string)$color]);
    }

    /** A StatsD-style metric: $type 'counter' (added up), 'gauge' or 'timing'. */
    public function metric(string $name, $value, string $type = 'counter')
    {
        if (!is_int($value) && !(is_float($value) && is_finite($value))) {
            throw new InvalidArgumentException("metric $name: the value must be a finite number");
        }
        if (!in_array($type, ['counter', 'gauge', 'timing'], true)) {
            throw new InvalidArgumentException("metric $name: the type is counter, gauge or timing, not $type");
        }
        $this->sendJson(self::METRIC, 0, ['name' => $name, 'value' => $value, 'type' => $type]);
    }

    /** @internal */
    public function forgetStream(ApmStream $stream)
    {
        $stream->open = false;
        unset($this->streams[$stream->id]);
    }

    private function sendJson(int $kind, int $id, array $fields)
    {
        try {
            $json = json_encode($fields, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE
                | JSON_PRESERVE_ZERO_FRACTION | JSON_THROW_ON_ERROR);
        } catch (JsonException $e) {
            throw new InvalidArgumentException('IPC data must be JSON: ' . $e->getMessage());
        }
        if (strlen($json) > $this->maxFrame) {
            throw new LengthException(sprintf('an IPC message is at most %d bytes of JSON', $this->maxFrame));
        }
        $this->ensureReady();
        $this->sendFrame($kind, $id, $json);
    }

    private function ownId(): int
    {
        do {
            $this->lastOwnId = $this->lastOwnId % self::MAX_OWN_ID + 1;
        } while (isset($this->waiting[$this->lastOwnId]) || isset($this->streams[$this->lastOwnId]));
        return $this->lastOwnId;
    }

    private static function ipcJson(string $payload, int $kind): array
    {
        $fields = json_decode($payload, true);
        if (!is_array($fields)) {
            self::protocolError("kind $kind: the payload is not a JSON object");
        }
        return $fields;
    }

    private function dispatchIpc(int $kind, int $id, string $payload)
    {
        if ($kind === self::IPC_MESSAGE) {
            $message = self::ipcJson($payload, $kind);
            $reply = null;
            if ($id !== 0) {
                $replied = false;
                $reply = function ($data = null) use ($id, &$replied) {
                    if (!$replied) {
                        $replied = true;
                        $this->sendJson(self::IPC_REPLY, $id, ['data' => $data]);
                    }
                };
            }
            $onChannel = $this->onChannel;
            $this->callApp('onChannel', $onChannel === null ? null : function (...$args) use ($onChannel, $reply) {
                $answer = $onChannel(...$args);
                if ($answer !== null && $reply !== null) {
                    $reply($answer);
                }
            }, [(string)($message['channel'] ?? ''), $message['data'] ?? null, $reply]);
            return;
        }
        if ($kind === self::IPC_RESULT) {
            $result = self::ipcJson($payload, $kind);
            if (isset($this->waiting[$id])) {
                unset($this->waiting[$id]);
                $this->results[$id] = ($result['status'] ?? null) === 'reply' ? ($result['data'] ?? null) : null;
            }
            return;
        }
        if ($kind === self::STREAM_OFFER) {
            $offer = self::ipcJson($payload, $kind);
            $this->offered($id, $offer);
            return;
        }
        if (strlen($payload) < 4) {
            self::protocolError(sprintf('kind %d with %d bytes, fewer than a peer id', $kind, strlen($payload)));
        }
        $peer = unpack('N', $payload)[1];
        $stream = $this->streams[$id] ?? null;
        if ($stream === null) {
            return; // it ended; frames may cross a close on the wire
        }
        if ($kind === self::STREAM_JOIN) {
            $stream->peers[] = $peer;
            if (!$stream->joined) {
                $stream->joined = true; // the answer to requestStream
            } else {
                $this->callApp('on_join', $stream->on_join, [$peer]);
            }
        } elseif ($kind === self::STREAM_DATA) {
            if (strlen($payload) < 5) {
                self::protocolError('stream_data without its type');
            }
            $binary = ord($payload[4]) === 0;
            $data = (string)substr($payload, 5);
            if (!$binary && !preg_match('//u', $data)) {
                self::protocolError("stream $id: a text message that is not UTF-8");
            }
            if ($stream->accepted) {
                $this->callApp('on_data', $stream->on_data, [$data, $binary, $stream->peer_id ?? $peer]);
            }
        } elseif ($peer !== 0 && $stream->peer_id === null) {
            $stream->peers = array_values(array_diff($stream->peers, [$peer]));
            $this->callApp('on_leave', $stream->on_leave, [$peer]);
        } else {
            $this->forgetStream($stream);
            if ($stream->peer_id === null ? $stream->joined : $stream->accepted) {
                $this->callApp('on_close', $stream->on_close, []);
            }
        }
    }

    private function offered(int $peer, array $offer)
    {
        $stream = new ApmStream($this, $peer, (string)($offer['channel'] ?? ''), $offer['head'] ?? null, $peer);
        $this->streams[$peer] = $stream;
        if ($this->onStream === null || !$this->callApp('onStream', $this->onStream, [$stream])) {
            $stream->close(); // declined
        }
    }

    /** Calls an app callback outside a session; false when it threw. */
    private function callApp(string $name, $function, array $args): bool
    {
        if ($function === null) {
            return true;
        }
        try {
            $function(...$args);
            return true;
        } catch (Throwable $e) {
            fwrite(STDERR, "apm_module: uncaught exception in $name: $e\n");
            return false;
        }
    }

    // ---- end of IPC ----
}

// ---- IPC between workers (feature "ipc", kinds 32-47; docs/connector-protocol.md) ----

/**
 * One IPC stream: the app's end of it, as the mediator (from
 * $apm->requestStream) or as a peer (given to $apm->onStream).
 *
 * A peer takes an offer with accept() (in onStream or later) and declines
 * it with close(); until then it neither receives nor writes. Callbacks:
 * on_data($data, bool $is_binary, int $peer_id) (a mediator hears which
 * peer wrote), on_join(int $peer_id) and on_leave(int $peer_id) (mediator:
 * peers after the first), on_close() (the stream is over; not after the
 * app's own close()). Writes to a closed stream are dropped.
 */
final class ApmStream
{
    public $channel;
    public $head;
    /** @var int|null a peer's own id; null for the mediator */
    public $peer_id;
    /** @var int[] the mediator's peers */
    public $peers = [];
    public $on_data;
    public $on_join;
    public $on_leave;
    public $on_close;

    /** @internal */ public $id;
    /** @internal */ public $open = true;
    /** @internal */ public $joined = false;   // mediator: the first peer came
    /** @internal */ public $accepted;         // a peer took the offer

    private $module;

    /** @internal */
    public function __construct(ApmModule $module, int $id, string $channel, $head, $peer)
    {
        $this->module = $module;
        $this->id = $id;
        $this->channel = $channel;
        $this->head = $head;
        $this->peer_id = $peer;
        $this->accepted = $peer === null;
    }

    /** A peer takes the offer. */
    public function accept(): ApmStream
    {
        if ($this->open && !$this->accepted) {
            $this->accepted = true;
            $this->module->sendFrame(ApmModule::STREAM_ACCEPT, $this->id, '');
        }
        return $this;
    }

    /**
     * The mediator writes to every peer, a peer to the mediator: a text
     * message (UTF-8), or bytes when $is_binary is true.
     */
    public function write($data, bool $is_binary = false)
    {
        return $this->writeFrame(0, $data, $is_binary);
    }

    /** The mediator writes to one peer. */
    public function write_to(int $peer, $data, bool $is_binary = false)
    {
        if ($this->peer_id !== null) {
            throw new LogicException('only the mediator of a stream writes to one peer');
        }
        return $this->writeFrame($peer, $data, $is_binary);
    }

    public function writeTo(int $peer, $data, bool $is_binary = false)
    {
        return $this->write_to($peer, $data, $is_binary);
    }

    /** The mediator ends the stream; a peer leaves it (or declines it, in onStream). */
    public function close()
    {
        if (!$this->open) {
            return;
        }
        $this->module->forgetStream($this);
        $this->module->sendFrame(ApmModule::STREAM_CLOSE, $this->id, pack('N', 0));
    }

    private function writeFrame(int $peer, $data, bool $binary)
    {
        if (!$this->open || !$this->accepted) {
            return false;
        }
        $data = (string)$data;
        if (!$binary && !preg_match('//u', $data)) {
            throw new InvalidArgumentException('a stream text message must be UTF-8; write($data, true) sends bytes');
        }
        if (strlen($data) > $this->module->maxFrame - 5) {
            throw new LengthException(sprintf('a stream write is at most %d bytes', $this->module->maxFrame - 5));
        }
        $this->module->sendFrame(ApmModule::STREAM_DATA, $this->id, pack('NC', $peer, $binary ? 0 : 1) . $data);
        return true;
    }
}

// ---- end of IPC ----

final class ApmSession
{
    const MAX_MESSAGE = 16777216;
    const MAX_CLOSE_REASON = 123;

    /** @var string 'http', 'ws' or 'tcp' */
    public $protocol;
    public $method;
    /** @var string the percent-encoded path, without the query string */
    public $path;
    /** @var string[] the path's segments, percent-decoded */
    public $path_array;
    public $query;
    /** @var array the query decoded; a repeated key gives an array of its values */
    public $query_object;
    /** @var array request headers, names lowercased */
    public $headers;
    public $cookies;
    public $remote_ip;
    public $tls;
    public $client_subject;
    public $session_id;
    public $instance_id;
    /** @var mixed the app's own, for the life of the session; save_session_data() keeps it across a hand-off */
    public $session_data = [];
    /** @var bool the session was handed over from another instance */
    public $migrated;

    /** @var callable|null function ($data, bool $is_binary): body bytes, TCP bytes or a whole WebSocket message */
    public $on_data;
    /** @var callable|null function (): HTTP body complete, or the TCP client finished sending (half-close) */
    public $on_end;
    /** @var callable|null function (int $code, string $reason): apm closed the session; not after the app's close() */
    public $on_close;

    /** @internal */ public $open = true;      // false once a close went out or came in
    /** @internal */ public $closing = false;  // the app called close(), or the session is handed off
    /** @internal */ public $credit;           // bytes we may still send
    /** @internal */ public $allowance;        // bytes apm may still send us
    /** @internal */ public $partial = '';     // a WebSocket message arriving in `more` fragments

    private $module;
    private $started = false; // HTTP: the response has begun
    private $queue = [];      // [kind, payload, offset] waiting for credit, in order

    /** @internal */
    public function __construct(ApmModule $module, int $sessionId, array $head)
    {
        $this->module = $module;
        $this->protocol = is_string($head['protocol'] ?? null) ? $head['protocol'] : 'http';
        $this->method = is_string($head['method'] ?? null) ? $head['method'] : '';
        $this->path = is_string($head['path'] ?? null) ? $head['path'] : '';
        $this->query = is_string($head['query'] ?? null) ? $head['query'] : '';
        $this->headers = is_array($head['headers'] ?? null) ? $head['headers'] : [];
        $this->remote_ip = $head['remote_ip'] ?? null;
        $this->tls = ($head['tls'] ?? false) === true;
        $this->client_subject = $head['client_subject'] ?? null;
        $this->session_id = $sessionId;
        $this->instance_id = $module->instance_id;
        $this->migrated = ($head['migrated'] ?? false) === true;
        if (array_key_exists('session_data', $head)) {
            $this->session_data = $head['session_data'];
        }
        // Split before decoding, so that an encoded '/' stays inside its segment.
        $this->path_array = [];
        foreach (explode('/', $this->path) as $segment) {
            if ($segment !== '') {
                $this->path_array[] = self::decode($segment);
            }
        }
        $this->query_object = self::parseQuery($this->query);
        $cookie = $this->headers['cookie'] ?? '';
        $this->cookies = self::parseCookies(is_string($cookie) ? $cookie : '');
        $this->credit = $module->window;
        $this->allowance = $module->window;
    }

    /**
     * Percent-decoding as JavaScript's decodeURIComponent, which the Node
     * connector uses: a malformed escape or bytes that are not UTF-8 leave
     * the text as sent.
     */
    public static function decode(string $text): string
    {
        if (strpos($text, '%') === false || preg_match('/%(?![0-9A-Fa-f]{2})/', $text)) {
            return $text;
        }
        $decoded = rawurldecode($text);
        return preg_match('//u', $decoded) ? $decoded : $text;
    }

    private static function parseQuery(string $query): array
    {
        $result = [];
        foreach (explode('&', $query) as $pair) {
            if ($pair === '') {
                continue;
            }
            $eq = strpos($pair, '=');
            $name = self::decode(str_replace('+', ' ', $eq === false ? $pair : substr($pair, 0, $eq)));
            $value = $eq === false ? '' : self::decode(str_replace('+', ' ', (string)substr($pair, $eq + 1)));
            if (!array_key_exists($name, $result)) {
                $result[$name] = $value;
            } elseif (is_array($result[$name])) {
                $result[$name][] = $value;
            } else {
                $result[$name] = [$result[$name], $value];
            }
        }
        return $result;
    }

    private static function parseCookies(string $header): array
    {
        $cookies = [];
        foreach (explode(';', $header) as $part) {
            $eq = strpos($part, '=');
            if ($eq === false) {
                continue;
            }
            $name = trim(substr($part, 0, $eq));
            // The first of two same-named cookies is the most specific one.
            if ($name === '' || array_key_exists($name, $cookies)) {
                continue;
            }
            $value = trim((string)substr($part, $eq + 1));
            if (strlen($value) >= 2 && $value[0] === '"' && substr($value, -1) === '"') {
                $value = substr($value, 1, -1);
            }
            $cookies[$name] = self::decode($value);
        }
        return $cookies;
    }

    /**
     * Sends body bytes (HTTP), bytes (TCP) or one WebSocket message.
     *
     * HTTP: $headers on the first write is the response head ('x-status' is
     * the status; an array value sends the header several times); later
     * headers are ignored. WebSocket: a text message, or a binary one when
     * the second argument is true. Writes never block: what exceeds the
     * session's credit waits in the connector. Throws on headers HTTP cannot
     * carry, or a text message that is not UTF-8.
     */
    public function write($data, $headers = null)
    {
        if ($this->closing) {
            return false;
        }
        $data = (string)$data;
        if ($this->protocol === 'ws') {
            $binary = $headers === true;
            if (!$binary && !preg_match('//u', $data)) {
                throw new InvalidArgumentException('a WebSocket text message must be UTF-8; '
                    . 'write($data, true) sends a binary message');
            }
            if (strlen($data) > self::MAX_MESSAGE) {
                throw new LengthException('a WebSocket message is at most 16 MiB');
            }
            $this->enqueue($binary ? ApmModule::DATA : ApmModule::TEXT, $data);
            return true;
        }
        if ($this->protocol === 'http' && !$this->started) {
            if (is_array($headers) && $headers) {
                $head = $this->encodeHead($headers);
                $this->started = true;
                $this->enqueue(ApmModule::HEAD, $head);
            }
            $this->started = true;
        }
        if ($data !== '') {
            $this->enqueue(ApmModule::DATA, $data);
        }
        return true;
    }

    /**
     * Bytes for the client's socket as they are (WebSocket: outside its
     * framing; HTTP and TCP: the same as write()).
     */
    public function write_raw($data)
    {
        if ($this->closing) {
            return false;
        }
        $data = (string)$data;
        $this->started = true;
        if ($data !== '') {
            $this->enqueue(ApmModule::RAW, $data);
        }
        return true;
    }

    public function writeRaw($data)
    {
        return $this->write_raw($data);
    }

    /**
     * Ends the session once the queued writes are out (HTTP: ends the
     * response; WebSocket: close code and reason, 1000 by default).
     */
    public function close($code = null, $reason = null)
    {
        if ($this->closing) {
            return;
        }
        $this->closing = true;
        if ($code === null && $reason === null && $this->protocol !== 'ws') {
            $payload = '';
        } else {
            if ($code === null) {
                $code = $this->protocol === 'ws' ? 1000 : 0;
            }
            $payload = pack('n', (int)$code) . self::cutReason((string)$reason);
        }
        $this->enqueue(ApmModule::CLOSE, $payload);
    }

    /**
     * Copies session_data into apm, which hands it to the instance that takes
     * this session over in a restart (worker option session_persist).
     */
    public function save_session_data()
    {
        if (!$this->open) {
            return false;
        }
        // An empty PHP array is an empty object to the other languages.
        $json = $this->session_data === [] ? '{}'
            : json_encode($this->session_data, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_THROW_ON_ERROR);
        if (strlen($json) > $this->module->sessionDataMax) {
            throw new LengthException(sprintf('save_session_data(): session_data is %d bytes as JSON; apm keeps at most %d per session',
                strlen($json), $this->module->sessionDataMax));
        }
        $this->module->sendFrame(ApmModule::SAVE, $this->session_id, $json);
        return true;
    }

    public function saveSessionData()
    {
        return $this->save_session_data();
    }

    // The connector's side.

    private static function cutReason(string $reason): string
    {
        if (strlen($reason) <= self::MAX_CLOSE_REASON) {
            return $reason;
        }
        $end = self::MAX_CLOSE_REASON;
        while ($end > 0 && (ord($reason[$end]) & 0xC0) === 0x80) {
            $end--; // do not cut a character in half
        }
        return substr($reason, 0, $end);
    }

    private function encodeHead(array $headers): string
    {
        $head = [];
        foreach ($headers as $rawName => $value) {
            if ($value === null) {
                continue;
            }
            $name = strtolower((string)$rawName);
            if (!preg_match('/^[!#$%&\'*+\-.^_`|~0-9a-z]+$/', $name)) {
                throw new InvalidArgumentException('invalid header name: ' . json_encode((string)$rawName));
            }
            $values = is_array($value) ? array_map(function ($v) use ($name) {
                return self::headerValue($name, $v);
            }, array_values($value)) : self::headerValue($name, $value);
            if (isset($head[$name])) {
                // Set-Cookie and set-cookie are one header.
                $values = array_merge((array)$head[$name], (array)$values);
            }
            $head[$name] = $values;
        }
        if (isset($head['x-status']) && (is_array($head['x-status'])
                || !preg_match('/^[1-9][0-9][0-9]$/', $head['x-status']))) {
            throw new InvalidArgumentException('x-status must be a three-digit HTTP status, not '
                . json_encode($head['x-status']));
        }
        try {
            $json = json_encode((object)$head, JSON_UNESCAPED_SLASHES | JSON_THROW_ON_ERROR);
        } catch (JsonException $e) {
            throw new InvalidArgumentException('a header value is not UTF-8');
        }
        if (strlen($json) > $this->module->maxFrame) {
            throw new LengthException('the response headers do not fit in one frame');
        }
        return $json;
    }

    private static function headerValue(string $name, $value): string
    {
        if (is_bool($value)) {
            $value = $value ? 'true' : 'false';
        } elseif (!is_string($value) && !is_int($value) && !is_float($value)) {
            throw new InvalidArgumentException("header $name: a value must be a string or an array of strings");
        }
        $value = (string)$value;
        // apm treats a malformed head as a broken connector and kills the
        // instance; refusing here fails one request instead.
        if (strpbrk($value, "\r\n\0") !== false) {
            throw new InvalidArgumentException("header $name: a value may not contain CR, LF or NUL");
        }
        return $value;
    }

    private function enqueue(int $kind, string $payload)
    {
        $this->queue[] = [$kind, $payload, 0];
        $this->pump();
    }

    /** @internal Moves queued writes to the channel as far as credit allows. */
    public function pump()
    {
        $module = $this->module;
        while ($this->queue && $this->open) {
            [$kind, $payload, $offset] = $this->queue[0];
            if ($kind === ApmModule::HEAD || $kind === ApmModule::CLOSE || $kind === ApmModule::HANDED) {
                $module->sendFrame($kind, $this->session_id, $payload);
                array_shift($this->queue);
                if ($kind !== ApmModule::HEAD) {
                    $this->forget();
                }
                continue;
            }
            $left = strlen($payload) - $offset;
            $room = min($module->maxFrame, $this->credit);
            if ($left <= $room) {
                $module->sendFrame($kind, $this->session_id, $offset ? substr($payload, $offset) : $payload);
                $this->credit -= $left;
                array_shift($this->queue);
                continue;
            }
            // Too big for one frame now: send the part credit allows. A
            // WebSocket message goes out as `more` fragments so that apm
            // reassembles it; bytes of a stream need no such marking.
            if ($kind === ApmModule::TEXT) {
                while ($room > 0 && (ord($payload[$offset + $room]) & 0xC0) === 0x80) {
                    $room--; // do not cut a character in half
                }
            }
            if ($room <= 0) {
                return;
            }
            $lead = $this->protocol === 'ws' && $kind !== ApmModule::RAW ? ApmModule::MORE : $kind;
            $module->sendFrame($lead, $this->session_id, substr($payload, $offset, $room));
            $this->credit -= $room;
            $this->queue[0][2] = $offset + $room;
        }
    }

    /** @internal */
    public function forget()
    {
        $this->open = false;
        $this->closing = true;
        $this->queue = [];
        $this->partial = '';
        unset($this->module->sessions[$this->session_id]);
    }

    /**
     * @internal apm moves the session to another instance: what the app
     * queued goes out, then `handed`, and later writes are dropped.
     */
    public function handOff()
    {
        if ($this->closing) {
            return; // the app's close is on its way and ends the session instead
        }
        $this->closing = true;
        $this->enqueue(ApmModule::HANDED, '');
    }

    /** @internal An app callback threw: end the session the way the client understands best. */
    public function failed()
    {
        if ($this->closing) {
            return;
        }
        if ($this->protocol === 'http' && !$this->started) {
            $this->write("Internal Server Error\n", ['x-status' => '500', 'content-type' => 'text/plain']);
        }
        if ($this->protocol === 'ws') {
            $this->close(1011, 'internal error');
        } else {
            $this->close();
        }
    }
}
