<?php
// The session hand-off test app (tests/it/sessions.rs), PHP flavour; it
// behaves as session_counter.py: each counter must be the last one plus 1,
// and the answer carries the running total, whichever instance gives it.

require_once __DIR__ . '/../../connectors/apm_module.php';

function serve(ApmSession $s)
{
    if ($s->protocol === 'http') {
        $s->write('ok ' . getmypid() . "\n", ['content-type' => 'text/plain']);
        $s->close();
        return;
    }
    if (!$s->migrated) {
        $s->session_data = ['last' => 0, 'total' => 0, 'rest' => ''];
    }
    $answer = function ($text) use ($s) {
        $s->write($s->protocol === 'tcp' ? "$text\n" : $text);
    };
    $take = function ($word) use ($s, $answer) {
        if ($word === 'big') {
            $kept = $s->session_data['blob'] ?? null;
            $s->session_data['blob'] = str_repeat('x', 100000);
            try {
                $s->save_session_data();
                $answer('big: saved');
            } catch (LengthException $e) {
                $answer('big: ' . $e->getMessage());
            }
            $s->session_data['blob'] = $kept;
            return;
        }
        $last = $s->session_data['last'];
        if (!ctype_digit($word) || (int)$word !== $last + 1) {
            $answer("gap $last $word");
            return;
        }
        $s->session_data['last'] = (int)$word;
        $s->session_data['total'] += (int)$word;
        $answer(sprintf('%d %d %d', $s->session_data['last'], $s->session_data['total'], getmypid()));
    };
    $s->on_data = function ($data, $is_binary) use ($s, $take) {
        if ($s->protocol === 'ws') {
            $take($data);
        } else {
            $lines = explode("\n", $s->session_data['rest'] . $data);
            $s->session_data['rest'] = array_pop($lines);
            foreach ($lines as $line) {
                $take($line);
            }
        }
        $s->save_session_data();
    };
}

$never = getenv('NEVER_READY');
if ($never !== false && file_exists($never)) {
    while (true) {
        sleep(1);
    }
}
(new ApmModule('serve'))->run();
