<?php
// The IPC test agent of tests/apps/ipc_agent.py (tests/it/ipc.rs), in PHP:
// the same commands on its control channel `ctl.<AGENT>`, the same environment.

require_once __DIR__ . '/../../connectors/apm_module.php';

$name = getenv('AGENT');
$delay = getenv('REPLY_DELAY_MS');
$inbox = [];
$current = null;

$apm = new ApmModule(function (ApmSession $s) use ($name) {
    $s->write("agent $name");
    $s->close();
});

$track = function (ApmStream $s) use (&$inbox, &$current) {
    $current = $s;
    $s->on_data = function ($data, $is_binary, $peer) use (&$inbox, $s) {
        $inbox[] = ['ev' => 'data', 'data' => $data, 'peer' => $s->peer_id === null ? $peer : null];
    };
    $s->on_close = function () use (&$inbox) {
        $inbox[] = ['ev' => 'close'];
    };
    $s->on_join = function ($peer) use (&$inbox) {
        $inbox[] = ['ev' => 'join', 'peer' => $peer];
    };
    $s->on_leave = function ($peer) use (&$inbox) {
        $inbox[] = ['ev' => 'leave', 'peer' => $peer];
    };
};

$commands = [
    'send' => function ($c) use ($apm) {
        $apm->send($c['channel'], $c['data'] ?? null);
        return 'sent';
    },
    'request' => function ($c) use ($apm) {
        $started = microtime(true);
        $data = $apm->request($c['channel'], $c['data'] ?? null, $c['timeout'] ?? null);
        return ['data' => $data, 'ms' => (microtime(true) - $started) * 1000];
    },
    'inbox' => function ($c) use (&$inbox) {
        $taken = $inbox;
        $inbox = [];
        return $taken;
    },
    'open' => function ($c) use ($apm, $track) {
        $s = $apm->requestStream($c['channel'], $c['head'] ?? null, $c['timeout'] ?? null);
        if ($s === null) {
            return ['ok' => false];
        }
        $track($s);
        return ['ok' => true];
    },
    'write' => function ($c) use (&$current) {
        return $current !== null && $current->write($c['data']);
    },
    'close' => function ($c) use (&$current) {
        if ($current !== null) {
            $current->close();
        }
        return 'closed';
    },
];

$apm->onChannel = function ($channel, $data, $reply) use ($name, $delay, $commands, &$inbox) {
    if ($channel === "ctl.$name") {
        return $commands[$data['do']]($data);
    }
    $inbox[] = ['ev' => 'msg', 'channel' => $channel, 'data' => $data];
    if ($reply !== null && $delay !== false) {
        // Said before the wait, so a test knows the request is pending here.
        echo "agent $name: answering in $delay ms\n";
        usleep((int)$delay * 1000);
        return ['from' => $name];
    }
    return null;
};
$apm->onStream = function (ApmStream $s) use ($track, &$inbox) {
    $inbox[] = ['ev' => 'offer', 'peer' => $s->peer_id, 'head' => $s->head];
    if (getenv('ACCEPT_STREAMS') === false) {
        $s->close();
    } else {
        $track($s->accept());
    }
};
$apm->run();
