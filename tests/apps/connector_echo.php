<?php
// The shared connector test app ("connector_echo"), PHP flavour.
//
// Same behaviour in every language; see tests/connectors/conformance.py,
// which drives it as apm's daemon would.

require_once __DIR__ . '/../../connectors/apm_module.php';

function serve_http(ApmSession $s)
{
    // A line per request on stdout: it must reach the log, not the channel.
    echo "connector_echo: {$s->method} {$s->path}\n";
    $s->session_data['body_length'] = 0;

    if ($s->path === '/throw') {
        throw new RuntimeException('connector_echo: thrown on purpose');
    }
    if ($s->path === '/bad-header') {
        $s->write('no', ['x-status' => '200', 'x-bad' => "a\r\nb"]); // throws
        return;
    }
    if (strpos($s->path, '/ipc/') === 0) {
        $s->on_end = function () use ($s) {
            serve_ipc($s);
        };
        return;
    }

    if ($s->path === '/echo') {
        $headers = ['x-status' => '200', 'content-type' => 'application/octet-stream'];
        $s->on_data = function ($chunk, $is_binary) use ($s, $headers) {
            $s->write($chunk, $headers);
        };
        $s->on_end = function () use ($s, $headers) {
            $s->write('', $headers); // sends the head if the body was empty
            $s->close();
        };
        return;
    }

    $s->on_data = function ($chunk, $is_binary) use ($s) {
        $s->session_data['body_length'] += strlen($chunk);
    };
    $s->on_end = function () use ($s) {
        if (strpos($s->path, '/status/') === 0) {
            $status = substr($s->path, strlen('/status/'));
            $s->write("status $status", ['x-status' => $status, 'content-type' => 'text/plain']);
        } elseif ($s->path === '/cookies') {
            $s->write('ok', ['x-status' => '200', 'content-type' => 'text/plain', 'set-cookie' => ['a=1', 'b=2']]);
        } else {
            $s->write(json_encode([
                'lang' => 'php',
                'method' => $s->method,
                'path' => $s->path,
                'path_array' => $s->path_array,
                'query' => $s->query,
                'query_object' => (object)$s->query_object,
                'headers' => (object)$s->headers,
                'cookies' => (object)$s->cookies,
                'remote_ip' => $s->remote_ip,
                'session_id' => $s->session_id,
                'instance_id' => $s->instance_id,
                'client_subject' => $s->client_subject,
                'tls' => $s->tls,
                'pid' => getmypid(),
                'body_length' => $s->session_data['body_length'],
                'env_index' => getenv('APM_INDEX') === false ? null : getenv('APM_INDEX'),
            ], JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE), ['x-status' => '200', 'content-type' => 'application/json']);
        }
        $s->close();
    };
}

// IPC, as tests/connectors/conformance.py expects it (its IPC section).
function serve_ipc(ApmSession $s)
{
    global $apm;
    $json = ['x-status' => '200', 'content-type' => 'application/json'];
    if ($s->path === '/ipc/request') {
        $ms = $s->query_object['ms'] ?? null;
        $result = $apm->request('ask', ['q' => 1], $ms === null ? null : (int)$ms);
        $s->write(json_encode(['result' => $result]), $json);
    } elseif ($s->path === '/ipc/send') {
        $apm->send('news', ['n' => 1]);
        $s->write('sent', ['x-status' => '200', 'content-type' => 'text/plain']);
    } elseif ($s->path === '/ipc/dash') {
        $apm->setDashValue('load', 42.5, '#4f8cff');
        $apm->metric('hits', 3, 'counter');
        $s->write('ok', ['x-status' => '200', 'content-type' => 'text/plain']);
    } elseif ($s->path === '/ipc/stream') {
        $stream = $apm->requestStream('feed', ['from' => 'php'], 300);
        if ($stream === null) {
            $s->write(json_encode(['stream' => null]), $json);
        } else {
            $stream->write('to all');
            $stream->write_to($stream->peers[0], "\x00\x01", true);
            $stream->on_join = function ($peer) use ($stream) {
                $stream->write_to($peer, 'welcome');
            };
            $stream->on_data = function ($data, $is_binary, $peer) use ($stream) {
                if ($data === 'bye') {
                    $stream->close();
                } else {
                    $stream->write_to($peer, "got $data");
                }
            };
            $stream->on_leave = function ($peer) use ($apm) {
                $apm->send('left', $peer);
            };
            $s->write(json_encode(['stream' => $stream->channel, 'peers' => $stream->peers]), $json);
        }
    }
    $s->close();
}

function serve_ws(ApmSession $s)
{
    $s->on_data = function ($data, $is_binary) use ($s) {
        if (!$is_binary && $data === 'close') {
            $s->close(4000, 'bye');
        } elseif (!$is_binary && $data === 'throw') {
            throw new RuntimeException('connector_echo: thrown on purpose');
        } elseif (!$is_binary && strncmp($data, 'save ', 5) === 0) {
            // session hand-off: "save <json>" keeps it as session_data in apm
            $s->session_data = json_decode(substr($data, 5), true);
            try {
                $s->save_session_data();
                $s->write('saved');
            } catch (LengthException $e) {
                $s->write('refused: ' . $e->getMessage());
            }
        } elseif (!$is_binary && $data === 'data?') {
            // an empty PHP array is a JSON object here, as session_data is
            $data = $s->session_data === [] ? new stdClass() : $s->session_data;
            $s->write(json_encode(['migrated' => $s->migrated, 'session_data' => $data], JSON_UNESCAPED_UNICODE));
        } elseif (!$is_binary && $data === 'raw') {
            $s->write_raw("\x81\x04raw!");
        } else {
            $s->write($data, $is_binary); // text back as text, binary as binary
        }
    };
    $s->on_close = function ($code, $reason) {
    };
}

function serve_tcp(ApmSession $s)
{
    $s->on_data = function ($data, $is_binary) use ($s) {
        $s->write($data);
        if (substr($data, -5) === "quit\n") {
            $s->close();
        }
    };
    $s->on_end = function () use ($s) {
        // The client half-closed: it still gets the rest of the answer.
        $s->write("bye\n");
        $s->close();
    };
}

$apm = new ApmModule(function (ApmSession $s) {
    if ($s->protocol === 'ws') {
        serve_ws($s);
    } elseif ($s->protocol === 'tcp') {
        serve_tcp($s);
    } else {
        serve_http($s);
    }
});
$apm->onChannel = function ($channel, $data, $reply) use ($apm) {
    if ($reply !== null) {
        return ['lang' => 'php', 'channel' => $channel, 'echo' => $data]; // answers the request
    }
    $apm->send('echoed', ['channel' => $channel, 'echo' => $data]);
    return null;
};
$apm->onStream = function (ApmStream $stream) use ($apm) {
    if (($stream->head['decline'] ?? false) === true) {
        $stream->close();
        return;
    }
    $stream->accept()->write("hello {$stream->channel}");
    $stream->on_data = function ($data, $is_binary) use ($stream) {
        if ($data === 'leave') {
            $stream->close();
        } else {
            $stream->write($data, $is_binary);
        }
    };
    $stream->on_close = function () use ($apm, $stream) {
        $apm->send('stream-closed', $stream->peer_id);
    };
};
if (getenv('CONNECTOR_ECHO_BOOT') === '1') {
    $apm->send('booted', $apm->request('boot', ['lang' => 'php']));
}
$apm->run();
