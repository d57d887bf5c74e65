# The shared connector test app ("connector_echo"), Perl flavour.
#
# Same behaviour in every language; see tests/connectors/conformance.py,
# which drives it as apm's daemon would.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/../../connectors";

use ApmModule;

$| = 1;

sub serve_http {
    my ($s) = @_;
    # A line per request on stdout: it must reach the log, not the channel.
    print "connector_echo: $s->{method} $s->{path}\n";
    $s->{session_data}{body_length} = 0;

    die "connector_echo: thrown on purpose\n" if $s->{path} eq '/throw';
    if ($s->{path} eq '/bad-header') {
        $s->write('no', { 'x-status' => '200', 'x-bad' => "a\r\nb" }); # dies
        return;
    }
    if ($s->{path} =~ m{\A/ipc/}) {
        $s->{on_end} = sub { serve_ipc($s) };
        return;
    }

    if ($s->{path} eq '/echo') {
        my $headers = { 'x-status' => '200', 'content-type' => 'application/octet-stream' };
        $s->{on_data} = sub { $s->write($_[0], $headers) };
        $s->{on_end} = sub {
            $s->write('', $headers); # sends the head if the body was empty
            $s->close;
        };
        return;
    }

    $s->{on_data} = sub { $s->{session_data}{body_length} += length $_[0] };
    $s->{on_end} = sub {
        if ($s->{path} =~ m{\A/status/(.*)\z}) {
            $s->write("status $1", { 'x-status' => $1, 'content-type' => 'text/plain' });
        } elsif ($s->{path} eq '/cookies') {
            $s->write('ok', { 'x-status' => '200', 'content-type' => 'text/plain', 'set-cookie' => ['a=1', 'b=2'] });
        } else {
            $s->write($ApmModule::JSON->encode({
                lang           => 'perl',
                method         => $s->{method},
                path           => $s->{path},
                path_array     => $s->{path_array},
                query          => $s->{query},
                query_object   => $s->{query_object},
                headers        => $s->{headers},
                cookies        => $s->{cookies},
                remote_ip      => $s->{remote_ip},
                session_id     => $s->{session_id},
                instance_id    => $s->{instance_id},
                client_subject => $s->{client_subject},
                tls            => $s->{tls} ? \1 : \0,
                pid            => $$,
                body_length    => $s->{session_data}{body_length},
                env_index      => $ENV{APM_INDEX},
            }), { 'x-status' => '200', 'content-type' => 'application/json' });
        }
        $s->close;
    };
}

my $apm;

# IPC, as tests/connectors/conformance.py expects it (its IPC section).
sub serve_ipc {
    my ($s) = @_;
    my $json = { 'x-status' => '200', 'content-type' => 'application/json' };
    if ($s->{path} eq '/ipc/request') {
        my $result = $apm->request('ask', { q => 1 }, $s->{query_object}{ms});
        $s->write($ApmModule::JSON->encode({ result => $result }), $json);
    } elsif ($s->{path} eq '/ipc/send') {
        $apm->send('news', { n => 1 });
        $s->write('sent', { 'x-status' => '200', 'content-type' => 'text/plain' });
    } elsif ($s->{path} eq '/ipc/dash') {
        $apm->setDashValue('load', 42.5, '#4f8cff');
        $apm->metric('hits', 3, 'counter');
        $s->write('ok', { 'x-status' => '200', 'content-type' => 'text/plain' });
    } elsif ($s->{path} eq '/ipc/stream') {
        my $stream = $apm->request_stream('feed', { from => 'perl' }, 300);
        if (!$stream) {
            $s->write($ApmModule::JSON->encode({ stream => undef }), $json);
        } else {
            $stream->write('to all');
            $stream->write_to($stream->{peers}[0], "\x00\x01", 1);
            $stream->{on_join} = sub { $stream->write_to($_[0], 'welcome') };
            $stream->{on_data} = sub {
                my ($data, $is_binary, $peer) = @_;
                if ($data eq 'bye') {
                    $stream->close;
                } else {
                    $stream->write_to($peer, "got $data");
                }
            };
            $stream->{on_leave} = sub { $apm->send('left', $_[0]) };
            $s->write($ApmModule::JSON->encode({ stream => $stream->{channel}, peers => $stream->{peers} }), $json);
        }
    }
    $s->close;
}

sub serve_ws {
    my ($s) = @_;
    $s->{on_data} = sub {
        my ($data, $is_binary) = @_;
        if (!$is_binary && $data eq 'close') {
            $s->close(4000, 'bye');
        } elsif (!$is_binary && $data eq 'throw') {
            die "connector_echo: thrown on purpose\n";
        } elsif (!$is_binary && $data =~ /\Asave (.*)\z/s) {
            # session hand-off: "save <json>" keeps it as session_data in apm
            my $json = $1;
            utf8::encode($json);
            $s->{session_data} = $ApmModule::JSON->decode($json);
            if (eval { $s->save_session_data; 1 }) {
                $s->write('saved');
            } else {
                (my $why = $@) =~ s/ at \S+ line \d+\.?\n?\z//;
                $s->write("refused: $why");
            }
        } elsif (!$is_binary && $data eq 'data?') {
            my $json = $ApmModule::JSON->encode({ migrated => $s->{migrated} ? \1 : \0, session_data => $s->{session_data} });
            utf8::decode($json); # a text message is characters, not the bytes of their encoding
            $s->write($json);
        } elsif (!$is_binary && $data eq 'raw') {
            $s->write_raw("\x81\x04raw!");
        } else {
            $s->write($data, $is_binary); # text back as text, binary as binary
        }
    };
    $s->{on_close} = sub { };
}

sub serve_tcp {
    my ($s) = @_;
    $s->{on_data} = sub {
        my ($data) = @_;
        $s->write($data);
        $s->close if $data =~ /quit\n\z/;
    };
    $s->{on_end} = sub {
        # The client half-closed: it still gets the rest of the answer.
        $s->write("bye\n");
        $s->close;
    };
}

$apm = ApmModule->new(sub {
    my ($s) = @_;
    if ($s->{protocol} eq 'ws') {
        serve_ws($s);
    } elsif ($s->{protocol} eq 'tcp') {
        serve_tcp($s);
    } else {
        serve_http($s);
    }
});
$apm->{on_channel} = sub {
    my ($channel, $data, $reply) = @_;
    if ($reply) {
        $reply->({ lang => 'perl', channel => $channel, echo => $data });
    } else {
        $apm->send('echoed', { channel => $channel, echo => $data });
    }
};
$apm->{on_stream} = sub {
    my ($stream) = @_;
    if (ref $stream->{head} eq 'HASH' && $stream->{head}{decline}) {
        $stream->close;
        return;
    }
    $stream->accept->write("hello $stream->{channel}");
    $stream->{on_data} = sub {
        my ($data, $is_binary) = @_;
        if (!$is_binary && $data eq 'leave') {
            $stream->close;
        } else {
            $stream->write($data, $is_binary);
        }
    };
    $stream->{on_close} = sub { $apm->send('stream-closed', $stream->{peer_id}) };
};
$apm->send('booted', $apm->request('boot', { lang => 'perl' })) if ($ENV{CONNECTOR_ECHO_BOOT} // '') eq '1';
$apm->run;
