# ApmModule.pm: the Perl connector of apm (connector protocol version 1).
#
# One drop-in file for Perl 5.10+: core modules, and JSON::PP (core since
# 5.14; Debian `perl`, or `libjson-perl` for JSON.pm). JSON::XS or
# Cpanel::JSON::XS is used instead when installed (Debian `libjson-xs-perl`),
# which is faster on headers:
#
#     use lib '/path/to/connectors';
#     use ApmModule;
#
#     my $apm = ApmModule->new(sub {
#         my ($s) = @_;
#         $s->write('Hello World', { 'x-status' => '200', 'content-type' => 'text/plain' });
#         $s->close;
#     });
#     $apm->run;
#
# apm owns the client's socket and hands each HTTP request, WebSocket or TCP
# connection to the app as a session, over the descriptor named by APM_FD
# (docs/connector-protocol.md is the contract). The loop is single-threaded:
# callbacks run one at a time, and sessions may only be used from them.
#
# A session is a hash: $s->{protocol}, {method}, {path}, {path_array},
# {query}, {query_object}, {headers}, {cookies}, {remote_ip}, {tls},
# {client_subject}, {session_id}, {instance_id}, {session_data},
# {migrated}; the app sets the callbacks {on_data} (sub ($data, $is_binary)),
# {on_end} and {on_close} (sub ($code, $reason)). Bodies and TCP bytes are
# byte strings; a WebSocket text message is a character string, and
# $s->write($text) sends one, $s->write($bytes, 1) a binary message.
#
# IPC with other workers (`listen` in their config): $apm->send($ch, $d),
# $apm->request($ch, $d, $timeout_ms) (blocks the app, not the loop),
# $apm->request_stream($ch, $head, $timeout_ms) (an ApmStream or undef),
# $apm->{on_channel} = sub { my ($ch, $d, $reply) = @_; ... },
# $apm->{on_stream} = sub { my ($stream) = @_; ... },
# $apm->set_dash_value($id, $value, $color) and
# $apm->metric($name, $value, 'counter'|'gauge'|'timing').

package ApmModule;

use strict;
use warnings;

use Encode ();
use Fcntl qw(F_GETFL F_SETFL F_SETFD FD_CLOEXEC O_NONBLOCK);
use POSIX qw(EAGAIN EWOULDBLOCK EINTR);
use Socket ();

# Exported by Socket only since Perl 5.14's; the Linux value before that.
use constant MSG_NOSIGNAL => eval { Socket::MSG_NOSIGNAL() } || 0x4000;

our $VERSION = '1';

use constant {
    PROTOCOL => 1,
    K_HELLO    => 1,
    K_READY    => 2,
    K_OPEN     => 16,
    K_DATA     => 17,
    K_TEXT     => 18,
    K_MORE     => 19,
    K_END      => 20,
    K_HEAD     => 21,
    K_RAW      => 22,
    K_CLOSE    => 23,
    K_CREDIT   => 24,
    # Session hand-off (feature "migrate").
    K_SAVE     => 48,
    K_MIGRATE  => 49,
    K_HANDED   => 50,
    # Until `hello` announces them, the version 1 values bound frames.
    DEFAULT_MAX_FRAME        => 1048576,
    DEFAULT_WINDOW           => 262144,
    DEFAULT_SESSION_DATA_MAX => 65536,
    READ_SIZE                => 262144,
};

my %RECEIVED = map { $_ => 1 } (K_OPEN, K_DATA, K_TEXT, K_MORE, K_END, K_CLOSE, K_CREDIT, K_MIGRATE);

our $JSON = do {
    my $codec;
    for my $module (qw(Cpanel::JSON::XS JSON::XS JSON::PP JSON)) {
        next unless eval "require $module; 1";
        $codec = $module->new->utf8->allow_nonref;
        last;
    }
    $codec or _die('no JSON module: install JSON::PP (Debian: perl) or JSON::XS (libjson-xs-perl)');
};

sub _die {
    my ($message) = @_;
    print STDERR "apm_module: $message\n";
    exit 1;
}

sub _protocol_error {
    my ($why) = @_;
    _die("protocol error from apm: $why");
}

# Serve with ApmModule->new(sub { my ($session) = @_; ... })->run.
# $apm->{worker} and $apm->{instance_id} come from apm's hello.
sub new {
    my ($class, $on_connect) = @_;
    _die('start this app with apm run (APM is not set)') unless ($ENV{APM} // '') eq '1';
    my $fd = $ENV{APM_FD};
    _die('this worker has no connector channel: give it server lines and upstream connector (APM_FD is not set)')
        unless defined $fd && $fd ne '';
    _die("APM_FD=$fd is not a usable channel: not a descriptor number") unless $fd =~ /\A[0-9]+\z/;
    open(my $channel, '+<&=', $fd) or _die("APM_FD=$fd is not a usable channel: $!");
    binmode $channel;
    # Processes the app starts do not inherit the channel.
    fcntl($channel, F_SETFD, FD_CLOEXEC) or _die("APM_FD=$fd is not a usable channel: $!");
    my $self = bless {
        on_connect       => $on_connect,
        worker           => undef,
        instance_id      => undef,
        _channel         => $channel,
        _fileno          => fileno($channel),
        _max_frame       => DEFAULT_MAX_FRAME,
        _window          => DEFAULT_WINDOW,
        _session_data_max => DEFAULT_SESSION_DATA_MAX,
        _sessions        => {},
        _inbuf           => '',
        _inpos           => 0,
        _out             => '',
    }, $class;
    $self->_handshake;
    return $self;
}

sub _handshake {
    my ($self) = @_;
    # apm writes hello as soon as the process starts, so blocking here is
    # short; it makes instance_id available before run().
    my $length = unpack('N', $self->_read_exact(4));
    if ($length < 5 || $length > 5 + $self->{_max_frame}) {
        _protocol_error(sprintf('a frame of %d bytes (the limit is %d)', $length, 5 + $self->{_max_frame}));
    }
    my $body = $self->_read_exact($length);
    my ($kind, $session) = unpack('CN', $body);
    _protocol_error("the first frame is kind $kind, not hello") unless $kind == K_HELLO && $session == 0;
    my $hello = eval { $JSON->decode(substr($body, 5)) };
    _protocol_error('hello is not a JSON object with a protocol')
        unless ref $hello eq 'HASH' && exists $hello->{protocol};
    my $version = $hello->{protocol} // 'null';
    if ($version !~ /\A[0-9]+\z/ || $version != PROTOCOL) {
        _die(sprintf('this connector speaks protocol %d, apm speaks %s; update apm_module', PROTOCOL, $version));
    }
    $self->{worker} = $hello->{worker};
    $self->{instance_id} = $hello->{instance_id};
    $self->{_max_frame} = int($hello->{max_frame} // DEFAULT_MAX_FRAME);
    $self->{_window} = int($hello->{window} // DEFAULT_WINDOW);
    $self->{_session_data_max} = int($hello->{session_data_max} // DEFAULT_SESSION_DATA_MAX);
}

sub _read_exact {
    my ($self, $size) = @_;
    my $data = '';
    while (length($data) < $size) {
        my $got = sysread($self->{_channel}, $data, $size - length($data), length($data));
        next if !defined $got && $! == EINTR;
        exit 0 unless $got; # apm closed the channel before greeting
    }
    return $data;
}

# Serves sessions (and IPC) until apm closes the channel. Does not return.
# A worker without server lines may run without a handler.
sub run {
    my ($self) = @_;
    $self->_ensure_ready;
    $self->_pump_once(undef) while 1;
}

# Says `ready` once: from run(), or from the first IPC call before it.
sub _ensure_ready {
    my ($self) = @_;
    return if $self->{_ready_sent};
    $self->{_ready_sent} = 1;
    my $ready = {
        protocol   => PROTOCOL,
        connector  => sprintf('perl %vd', $^V),
        half_close => \1,
        features   => ['migrate', 'ipc'],
    };
    $self->_send(K_READY, 0, $JSON->encode($ready));
    my $flags = fcntl($self->{_channel}, F_GETFL, 0) or _die("cannot read the channel's flags: $!");
    fcntl($self->{_channel}, F_SETFL, $flags | O_NONBLOCK) or _die("cannot make the channel non-blocking: $!");
}

# One turn of the loop: flush, wait up to $timeout seconds (undef: until
# something happens) and handle what arrived.
sub _pump_once {
    my ($self, $timeout) = @_;
    $self->_flush;
    my $bits = '';
    vec($bits, $self->{_fileno}, 1) = 1;
    my $read = $bits;
    my $write = $self->{_out} eq '' ? undef : $bits;
    my $ready = select($read, $write, undef, $timeout);
    return if $ready <= 0; # a timeout, or interrupted by a signal
    $self->_read_available if vec($read, $self->{_fileno}, 1);
}

# The channel.

sub _send {
    my ($self, $kind, $session, $payload) = @_;
    $self->{_out} .= pack('NCN', 5 + length($payload), $kind, $session) . $payload;
}

sub _flush {
    my ($self) = @_;
    while ($self->{_out} ne '') {
        # MSG_NOSIGNAL: a daemon that went away is an error here, not a SIGPIPE.
        my $sent = CORE::send($self->{_channel}, $self->{_out}, MSG_NOSIGNAL);
        if (!defined $sent) {
            return if $! == EAGAIN || $! == EWOULDBLOCK;
            next if $! == EINTR;
            exit 0; # apm is gone; it restarts or stops us anyway
        }
        substr($self->{_out}, 0, $sent, '');
    }
}

sub _read_available {
    my ($self) = @_;
    my $got = sysread($self->{_channel}, $self->{_inbuf}, READ_SIZE, length $self->{_inbuf});
    if (!defined $got) {
        return if $! == EAGAIN || $! == EWOULDBLOCK || $! == EINTR;
        exit 0;
    }
    exit 0 if $got == 0; # apm closed the channel: it is stopping this instance
    $self->_parse;
}

sub _parse {
    my ($self) = @_;
    # The position lives in the module: a callback may pump the loop (IPC)
    # and parse the frames after its own.
    while (length($self->{_inbuf}) - $self->{_inpos} >= 4) {
        my $pos = $self->{_inpos};
        my $length = unpack('N', substr($self->{_inbuf}, $pos, 4));
        # Checked before waiting for the rest: a bad length must not make us
        # buffer gigabytes.
        if ($length < 5 || $length > 5 + $self->{_max_frame}) {
            _protocol_error(sprintf('a frame of %d bytes (the limit is %d)', $length, 5 + $self->{_max_frame}));
        }
        last if length($self->{_inbuf}) - $pos - 4 < $length;
        my ($kind, $session) = unpack('CN', substr($self->{_inbuf}, $pos + 4, 5));
        my $payload = substr($self->{_inbuf}, $pos + 9, $length - 5);
        $self->{_inpos} = $pos + 4 + $length;
        $self->_dispatch($kind, $session, $payload);
    }
    if ($self->{_inpos}) {
        substr($self->{_inbuf}, 0, $self->{_inpos}, '');
        $self->{_inpos} = 0;
    }
}

sub _dispatch {
    my ($self, $kind, $session_id, $payload) = @_;
    return $self->_dispatch_ipc($kind, $session_id, $payload) if $ApmModule::IPC_RECEIVED{$kind};
    _protocol_error("kind $kind is not for a connector to receive") unless $RECEIVED{$kind};
    _protocol_error("kind $kind on the channel instead of a session") if $session_id == 0;
    if ($kind == K_OPEN) {
        $self->_open_session($session_id, $payload);
        return;
    }
    my $session = $self->{_sessions}{$session_id} or return; # it ended; frames may cross a close
    if ($kind == K_CREDIT) {
        _protocol_error(sprintf('a credit of %d bytes', length $payload)) unless length($payload) == 4;
        $session->{_credit} += unpack('N', $payload);
        $session->_pump;
    } elsif ($kind == K_CLOSE) {
        _protocol_error('a close of one byte') if length($payload) == 1;
        my $code = length($payload) ? unpack('n', $payload) : 0;
        my $reason = Encode::decode('UTF-8', substr($payload, 2));
        my $app_closed = $session->{_closing};
        $session->_forget;
        $self->_call($session, 'on_close', $code, $reason) unless $app_closed;
    } elsif ($kind == K_END) {
        return if $session->{_closing};
        if (!$session->{on_end} && $session->{protocol} eq 'tcp') {
            # As a socket that does not allow half-open connections: the
            # client is done, so is the session, once its answer is out.
            $session->close;
        } else {
            $self->_call($session, 'on_end');
        }
    } elsif ($kind == K_MIGRATE) {
        $session->_hand_off;
    } else {
        $self->_receive($session, $kind, $payload);
    }
}

sub _open_session {
    my ($self, $session_id, $payload) = @_;
    _protocol_error("open for session $session_id, which is open") if $self->{_sessions}{$session_id};
    my $head = eval { $JSON->decode($payload) };
    _protocol_error('open is not a JSON object') unless ref $head eq 'HASH';
    my $session = ApmSession->_new($self, $session_id, $head);
    $self->{_sessions}{$session_id} = $session;
    if (!$self->{on_connect}) {
        print STDERR "apm_module: session $session_id: the app gave ApmModule no session handler\n";
        $session->_failed;
        return;
    }
    $self->_call($session, undef, $session);
}

sub _receive {
    my ($self, $session, $kind, $payload) = @_;
    my $size = length $payload;
    $session->{_allowance} -= $size;
    _protocol_error("session $session->{session_id}: data beyond the window") if $session->{_allowance} < 0;
    return if $session->{_closing}; # the app has answered; nobody wants the rest
    if ($session->{protocol} eq 'ws') {
        if ($kind == K_MORE) {
            # apm sends the rest of a big message only as credit comes back,
            # so fragments are credited as soon as they are buffered.
            $session->{_partial} .= $payload;
            $self->_give_credit($session, $size);
            return;
        }
        my $message = $payload;
        if ($session->{_partial} ne '') {
            $message = $session->{_partial} . $payload;
            $session->{_partial} = '';
        }
        if ($kind == K_TEXT) {
            my $text = eval { Encode::decode('UTF-8', $message, Encode::FB_CROAK | Encode::LEAVE_SRC) };
            _protocol_error("session $session->{session_id}: a text message that is not UTF-8") unless defined $text;
            $message = $text;
        }
        $self->_call($session, 'on_data', $message, $kind == K_DATA ? 1 : 0);
    } else {
        # A byte stream: `more` fragments are just bytes, passed on as they come.
        $self->_call($session, 'on_data', $payload, 1);
    }
    # Consumed once the app's callback has returned.
    $self->_give_credit($session, $size);
}

sub _give_credit {
    my ($self, $session, $size) = @_;
    return unless $size && $session->{_open};
    $session->{_allowance} += $size;
    $self->_send(K_CREDIT, $session->{session_id}, pack('N', $size));
}

# Calls the app's handler (undef) or one of the session's callbacks.
sub _call {
    my ($self, $session, $callback, @args) = @_;
    my $function = defined $callback ? $session->{$callback} : $self->{on_connect};
    return unless $function;
    local $@;
    return if eval { $function->(@args); 1 };
    # The app's bug ends its session, not the instance.
    my $error = $@;
    $error =~ s/\s+\z//;
    printf STDERR "apm_module: session %d: uncaught exception in %s: %s\n",
        $session->{session_id}, $callback // 'the session handler', $error;
    $session->_failed;
}

# ---- IPC between workers (feature "ipc", kinds 32-47; docs/connector-protocol.md) ----

use constant {
    K_IPC_SEND      => 32,
    K_IPC_REQUEST   => 33,
    K_IPC_MESSAGE   => 34,
    K_IPC_REPLY     => 35,
    K_IPC_RESULT    => 36,
    K_STREAM_OPEN   => 37,
    K_STREAM_OFFER  => 38,
    K_STREAM_ACCEPT => 39,
    K_STREAM_JOIN   => 40,
    K_STREAM_DATA   => 41,
    K_STREAM_CLOSE  => 42,
    K_DASH          => 43,
    K_METRIC        => 44,
    # Ids this side picks; apm's have the high bit set.
    MAX_OWN_ID      => 0x7fffffff,
};

our %IPC_RECEIVED = map { $_ => 1 }
    (K_IPC_MESSAGE, K_IPC_RESULT, K_STREAM_OFFER, K_STREAM_JOIN, K_STREAM_DATA, K_STREAM_CLOSE);

# Broadcasts $data (any JSON value) to every process listening on $channel.
sub send {
    my ($self, $channel, $data) = @_;
    $self->_send_json(K_IPC_SEND, 0, { channel => "$channel", data => $data });
}

# Sends $data to the listeners of $channel and returns the first reply's
# data, or undef (no listener, timeout, none replied). $timeout_ms: this
# call's timeout, else the worker's ipc_timeout, else 500 ms. The loop keeps
# serving meanwhile: callbacks of other sessions run.
sub request {
    my ($self, $channel, $data, $timeout_ms) = @_;
    my $id = $self->_own_id;
    $self->_send_json(K_IPC_REQUEST, $id, { channel => "$channel", data => $data,
        timeout_ms => defined $timeout_ms ? int($timeout_ms) : undef });
    $self->{_waiting}{$id} = 1;
    $self->_pump_once(undef) until exists $self->{_results}{$id};
    return delete $self->{_results}{$id};
}

# Opens a stream on $channel, $head for the listeners to judge it, and
# returns it (an ApmStream) once the first peer joined, or undef when none
# did. Pumps the loop as request() does.
sub request_stream {
    my ($self, $channel, $head, $timeout_ms) = @_;
    my $id = $self->_own_id;
    my $stream = ApmStream->_new($self, $id, "$channel", $head, undef);
    $self->_send_json(K_STREAM_OPEN, $id, { channel => "$channel", head => $head,
        timeout_ms => defined $timeout_ms ? int($timeout_ms) : undef });
    $self->{_streams}{$id} = $stream;
    $self->_pump_once(undef) while $stream->{_open} && !$stream->{_joined};
    return $stream->{_joined} ? $stream : undef;
}

# A value for the dashboard's panel $id (any JSON value, a color such as '#4f8cff').
sub set_dash_value {
    my ($self, $id, $value, $color) = @_;
    $self->_send_json(K_DASH, 0, { id => $id, value => $value, color => defined $color ? "$color" : undef });
}

sub setDashValue { goto &set_dash_value }

# A StatsD-style metric: $type 'counter' (added up, the default), 'gauge' or 'timing'.
sub metric {
    my ($self, $name, $value, $type) = @_;
    $type = 'counter' unless defined $type;
    die "metric $name: the value must be a finite number\n"
        unless defined $value && !ref $value && $value =~ /\A-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\z/;
    die "metric $name: the type is counter, gauge or timing, not $type\n" unless $type =~ /\A(?:counter|gauge|timing)\z/;
    $self->_send_json(K_METRIC, 0, { name => "$name", value => 0 + $value, type => $type });
}

sub _send_json {
    my ($self, $kind, $id, $fields) = @_;
    my $json = eval { $JSON->encode($fields) };
    die "IPC data must be JSON: $@" unless defined $json;
    die sprintf("an IPC message is at most %d bytes of JSON\n", $self->{_max_frame}) if length($json) > $self->{_max_frame};
    $self->_ensure_ready;
    $self->_send($kind, $id, $json);
}

sub _own_id {
    my ($self) = @_;
    my $id = $self->{_last_own_id} || 0;
    do { $id = $id % MAX_OWN_ID + 1 } while $self->{_waiting}{$id} || $self->{_streams}{$id};
    return $self->{_last_own_id} = $id;
}

sub _ipc_json {
    my ($payload, $kind) = @_;
    my $fields = eval { $JSON->decode($payload) };
    _protocol_error("kind $kind: the payload is not a JSON object") unless ref $fields eq 'HASH';
    return $fields;
}

sub _dispatch_ipc {
    my ($self, $kind, $id, $payload) = @_;
    if ($kind == K_IPC_MESSAGE) {
        my $message = _ipc_json($payload, $kind);
        my $reply;
        if ($id) {
            my $replied;
            $reply = sub {
                return if $replied++;
                $self->_send_json(K_IPC_REPLY, $id, { data => $_[0] });
            };
        }
        my $channel = defined $message->{channel} ? "$message->{channel}" : '';
        $self->_call_app('on_channel', $self->{on_channel}, $channel, $message->{data}, $reply);
        return;
    }
    if ($kind == K_IPC_RESULT) {
        my $result = _ipc_json($payload, $kind);
        if (delete $self->{_waiting}{$id}) {
            $self->{_results}{$id} = ($result->{status} // '') eq 'reply' ? $result->{data} : undef;
        }
        return;
    }
    if ($kind == K_STREAM_OFFER) {
        $self->_offered($id, _ipc_json($payload, $kind));
        return;
    }
    _protocol_error(sprintf('kind %d with %d bytes, fewer than a peer id', $kind, length $payload)) if length($payload) < 4;
    my $peer = unpack('N', $payload);
    my $stream = $self->{_streams}{$id} or return; # it ended; frames may cross a close on the wire
    if ($kind == K_STREAM_JOIN) {
        push @{ $stream->{peers} }, $peer;
        if ($stream->{_joined}) {
            $self->_call_app('on_join', $stream->{on_join}, $peer);
        } else {
            $stream->{_joined} = 1; # the answer to request_stream
        }
    } elsif ($kind == K_STREAM_DATA) {
        _protocol_error('stream_data without its type') if length($payload) < 5;
        my $binary = unpack('C', substr($payload, 4, 1)) == 0;
        my $data = substr($payload, 5);
        if (!$binary) {
            my $text = eval { Encode::decode('UTF-8', $data, Encode::FB_CROAK | Encode::LEAVE_SRC) };
            _protocol_error("stream $id: a text message that is not UTF-8") unless defined $text;
            $data = $text;
        }
        $self->_call_app('on_data', $stream->{on_data}, $data, $binary ? 1 : 0,
            defined $stream->{peer_id} ? $stream->{peer_id} : $peer) if $stream->{_accepted};
    } elsif ($peer && !defined $stream->{peer_id}) {
        $stream->{peers} = [grep { $_ != $peer } @{ $stream->{peers} }];
        $self->_call_app('on_leave', $stream->{on_leave}, $peer);
    } else {
        $self->_forget_stream($stream);
        $self->_call_app('on_close', $stream->{on_close})
            if defined $stream->{peer_id} ? $stream->{_accepted} : $stream->{_joined};
    }
}

sub _offered {
    my ($self, $peer, $offer) = @_;
    my $stream = ApmStream->_new($self, $peer, defined $offer->{channel} ? "$offer->{channel}" : '', $offer->{head}, $peer);
    $self->{_streams}{$peer} = $stream;
    $stream->close unless $self->{on_stream} && $self->_call_app('on_stream', $self->{on_stream}, $stream); # declined
}

sub _forget_stream {
    my ($self, $stream) = @_;
    $stream->{_open} = 0;
    delete $self->{_streams}{ $stream->{_id} };
}

# Calls an app callback outside a session; false when it died.
sub _call_app {
    my ($self, $name, $function, @args) = @_;
    return 1 unless $function;
    local $@;
    return 1 if eval { $function->(@args); 1 };
    (my $error = $@) =~ s/\s+\z//;
    print STDERR "apm_module: uncaught exception in $name: $error\n";
    return 0;
}

# One IPC stream: the app's end of it, as the mediator (from
# $apm->request_stream) or as a peer (given to $apm->{on_stream}, which
# takes the offer with $stream->accept and declines it with close; until
# then it neither hears nor writes). A hash: {channel}, {head}, {peer_id} (a
# peer's own id; undef for the mediator), {peers} (the mediator's); the app
# sets {on_data} (sub ($data, $is_binary, $peer_id)), {on_join} and
# {on_leave} (sub ($peer_id), the mediator's peers after the first),
# {on_close} (the stream is over; not after the app's own close). Writes to
# a closed stream are dropped.
package ApmStream;

use strict;
use warnings;

sub _new {
    my ($class, $module, $id, $channel, $head, $peer) = @_;
    return bless {
        channel  => $channel,
        head     => $head,
        peer_id  => $peer,
        peers    => [],
        on_data  => undef,
        on_join  => undef,
        on_leave => undef,
        on_close => undef,
        _module  => $module,
        _id      => $id,
        _open    => 1,
        _joined  => 0,     # mediator: the first peer came
        _accepted => !defined $peer, # a peer took the offer
    }, $class;
}

# A peer takes the offer.
sub accept {
    my ($self) = @_;
    if ($self->{_open} && !$self->{_accepted}) {
        $self->{_accepted} = 1;
        $self->{_module}->_send(ApmModule::K_STREAM_ACCEPT, $self->{_id}, '');
    }
    return $self;
}

# The mediator writes to every peer, a peer to the mediator: a text message
# (characters), or bytes when $is_binary is true.
sub write {
    my ($self, $data, $is_binary) = @_;
    return $self->_write_frame(0, $data, $is_binary);
}

# The mediator writes to one peer.
sub write_to {
    my ($self, $peer, $data, $is_binary) = @_;
    die "only the mediator of a stream writes to one peer\n" if defined $self->{peer_id};
    return $self->_write_frame($peer, $data, $is_binary);
}

# The mediator ends the stream; a peer leaves it (or declines it, in on_stream).
sub close {
    my ($self) = @_;
    return unless $self->{_open};
    $self->{_module}->_forget_stream($self);
    $self->{_module}->_send(ApmModule::K_STREAM_CLOSE, $self->{_id}, pack('N', 0));
}

sub _write_frame {
    my ($self, $peer, $data, $binary) = @_;
    return 0 unless $self->{_open} && $self->{_accepted};
    $data = '' unless defined $data;
    my $bytes = $binary ? ApmSession::_bytes($data) : Encode::encode('UTF-8', "$data", Encode::FB_CROAK | Encode::LEAVE_SRC);
    my $max = $self->{_module}{_max_frame} - 5;
    die "a stream write is at most $max bytes\n" if length($bytes) > $max;
    $self->{_module}->_send(ApmModule::K_STREAM_DATA, $self->{_id}, pack('NC', $peer, $binary ? 0 : 1) . $bytes);
    return 1;
}

# ---- end of IPC ----

package ApmSession;

use strict;
use warnings;

use constant {
    MAX_MESSAGE      => 16777216,
    MAX_CLOSE_REASON => 123,
};

sub _new {
    my ($class, $module, $session_id, $head) = @_;
    my ($protocol, $method, $path, $query) = map { defined && !ref ? "$_" : '' } @$head{qw(protocol method path query)};
    my $headers = ref $head->{headers} eq 'HASH' ? $head->{headers} : {};
    my $cookie = $headers->{cookie};
    return bless {
        protocol       => $protocol || 'http',
        method         => $method,
        path           => $path,
        # Split before decoding, so that an encoded '/' stays inside its segment.
        path_array     => [map { index($_, '%') < 0 ? $_ : _decode($_) } grep { $_ ne '' } split m{/}, $path],
        query          => $query,
        query_object   => $query eq '' ? {} : _parse_query($query),
        headers        => $headers,
        cookies        => defined $cookie && !ref $cookie ? _parse_cookies($cookie) : {},
        remote_ip      => $head->{remote_ip},
        tls            => $head->{tls} ? 1 : 0,
        client_subject => $head->{client_subject},
        # A number, also for JSON: the id was a hash key, which made it a string too.
        session_id     => 0 + $session_id,
        instance_id    => $module->{instance_id},
        session_data   => exists $head->{session_data} ? $head->{session_data} : {},
        migrated       => $head->{migrated} ? 1 : 0,
        on_data        => undef,
        on_end         => undef,
        on_close       => undef,
        _module        => $module,
        _open          => 1,   # false once a close went out or came in
        _closing       => 0,   # the app called close(), or the session is handed off
        _started       => 0,   # HTTP: the response has begun
        _credit        => $module->{_window},  # bytes we may still send
        _allowance     => $module->{_window},  # bytes apm may still send us
        _queue         => [],  # [kind, payload, offset] waiting for credit, in order
        _partial       => '',  # a WebSocket message arriving in `more` fragments
    }, $class;
}

# Percent-decoding as JavaScript's decodeURIComponent, which the Node
# connector uses: a malformed escape or bytes that are not UTF-8 leave the
# text as sent.
sub _decode {
    my ($text) = @_;
    return $text if index($text, '%') < 0 || $text =~ /%(?![0-9A-Fa-f]{2})/;
    (my $bytes = $text) =~ s/%([0-9A-Fa-f]{2})/chr hex $1/ge;
    my $decoded = eval { Encode::decode('UTF-8', $bytes, Encode::FB_CROAK | Encode::LEAVE_SRC) };
    return defined $decoded ? $decoded : $text;
}

sub _parse_query {
    my ($query) = @_;
    my %result;
    for my $pair (split /&/, $query) {
        next if $pair eq '';
        my ($name, $value) = split /=/, $pair, 2;
        $value = '' unless defined $value;
        tr/+/ / for $name, $value;
        ($name, $value) = (_decode($name), _decode($value));
        if (!exists $result{$name}) {
            $result{$name} = $value;
        } elsif (ref $result{$name}) {
            push @{ $result{$name} }, $value;
        } else {
            $result{$name} = [$result{$name}, $value];
        }
    }
    return \%result;
}

sub _parse_cookies {
    my ($header) = @_;
    my %cookies;
    for my $part (split /;/, $header) {
        my $eq = index($part, '=');
        next if $eq < 0;
        (my $name = substr($part, 0, $eq)) =~ s/\A\s+|\s+\z//g;
        # The first of two same-named cookies is the most specific one.
        next if $name eq '' || exists $cookies{$name};
        (my $value = substr($part, $eq + 1)) =~ s/\A\s+|\s+\z//g;
        $value = substr($value, 1, -1) if length($value) >= 2 && $value =~ /\A".*"\z/s;
        $cookies{$name} = _decode($value);
    }
    return \%cookies;
}

# Sends body bytes (HTTP), bytes (TCP) or one WebSocket message.
#
# HTTP: $headers (a hash) on the first write is the response head
# ('x-status' is the status; an array value sends the header several
# times); later headers are ignored. WebSocket: a text message (a character
# string), or a binary one (bytes) when the second argument is true. A
# character string on HTTP or TCP goes out UTF-8 encoded. Writes never
# block: what exceeds the session's credit waits in the connector. Dies on
# headers HTTP cannot carry.
sub write {
    my ($self, $data, $headers) = @_;
    return 0 if $self->{_closing};
    $data = '' unless defined $data;
    my $module = $self->{_module};
    if ($self->{protocol} eq 'ws') {
        my $binary = $headers && !ref $headers;
        my $payload = $binary ? _bytes($data) : Encode::encode('UTF-8', "$data", Encode::FB_CROAK | Encode::LEAVE_SRC);
        die "a WebSocket message is at most 16 MiB\n" if length($payload) > MAX_MESSAGE;
        $self->_enqueue($binary ? ApmModule::K_DATA : ApmModule::K_TEXT, $payload);
        return 1;
    }
    if ($self->{protocol} eq 'http' && !$self->{_started}) {
        if (ref $headers eq 'HASH' && %$headers) {
            my $head = $self->_encode_head($headers);
            $self->{_started} = 1;
            $self->_enqueue(ApmModule::K_HEAD, $head);
        }
        $self->{_started} = 1;
    }
    my $payload = _bytes($data);
    $self->_enqueue(ApmModule::K_DATA, $payload) if length $payload;
    return 1;
}

# Bytes for the client's socket as they are (WebSocket: outside its framing;
# HTTP and TCP: the same as write()).
sub write_raw {
    my ($self, $data) = @_;
    return 0 if $self->{_closing};
    my $payload = _bytes(defined $data ? $data : '');
    $self->{_started} = 1;
    $self->_enqueue(ApmModule::K_RAW, $payload) if length $payload;
    return 1;
}

# Ends the session once the queued writes are out (HTTP: ends the response;
# WebSocket: close code and reason, 1000 by default).
sub close {
    my ($self, $code, $reason) = @_;
    return if $self->{_closing};
    $self->{_closing} = 1;
    my $payload = '';
    if (defined $code || defined $reason || $self->{protocol} eq 'ws') {
        $code = $self->{protocol} eq 'ws' ? 1000 : 0 unless defined $code;
        $payload = pack('n', $code) . _cut_reason(Encode::encode('UTF-8', defined $reason ? "$reason" : ''));
    }
    $self->_enqueue(ApmModule::K_CLOSE, $payload);
}

# Copies {session_data} into apm, which hands it to the instance that takes
# this session over in a restart (worker option session_persist).
sub save_session_data {
    my ($self) = @_;
    return 0 unless $self->{_open};
    my $module = $self->{_module};
    my $json = $ApmModule::JSON->encode($self->{session_data});
    if (length($json) > $module->{_session_data_max}) {
        die sprintf("save_session_data(): session_data is %d bytes as JSON; apm keeps at most %d per session\n",
            length $json, $module->{_session_data_max});
    }
    $module->_send(ApmModule::K_SAVE, $self->{session_id}, $json);
    return 1;
}

# The connector's side.

sub _bytes {
    my ($data) = @_;
    return "$data" unless utf8::is_utf8($data);
    my $bytes = "$data";
    utf8::encode($bytes);
    return $bytes;
}

sub _cut_reason {
    my ($reason) = @_;
    return $reason if length($reason) <= MAX_CLOSE_REASON;
    my $end = MAX_CLOSE_REASON;
    $end-- while $end > 0 && (ord(substr($reason, $end, 1)) & 0xC0) == 0x80; # not in a character
    return substr($reason, 0, $end);
}

sub _encode_head {
    my ($self, $headers) = @_;
    my %head;
    while (my ($raw_name, $value) = each %$headers) {
        next unless defined $value;
        my $name = lc $raw_name;
        die "invalid header name: $raw_name\n" unless $name =~ /\A[!#\$%&'*+\-.^_`|~0-9a-z]+\z/;
        if (ref $value eq 'ARRAY') {
            $value = [map { _header_value($name, $_) } @$value];
        } else {
            # The common case, checked without a call.
            die "header $name: a value must be a string or an array of strings\n" if ref $value;
            die "header $name: a value may not contain CR, LF or NUL\n" if $value =~ /[\r\n\0]/;
            $value = "$value";
        }
        if (exists $head{$name}) {
            # Set-Cookie and set-cookie are one header.
            my $prev = $head{$name};
            $value = [ref $prev ? @$prev : $prev, ref $value ? @$value : $value];
        }
        $head{$name} = $value;
    }
    my $status = $head{'x-status'};
    if (defined $status && (ref $status || $status !~ /\A[1-9][0-9][0-9]\z/)) {
        die sprintf("x-status must be a three-digit HTTP status, not %s\n",
            ref $status ? '[' . join(', ', @$status) . ']' : $status);
    }
    my $json = $ApmModule::JSON->encode(\%head);
    die "the response headers do not fit in one frame\n" if length($json) > $self->{_module}{_max_frame};
    return $json;
}

sub _header_value {
    # apm treats a malformed head as a broken connector and kills the
    # instance; refusing here fails one request instead.
    die "header $_[0]: a value must be a string or an array of strings\n" if !defined $_[1] || ref $_[1];
    die "header $_[0]: a value may not contain CR, LF or NUL\n" if $_[1] =~ /[\r\n\0]/;
    return "$_[1]";
}

sub _enqueue {
    my ($self, $kind, $payload) = @_;
    my $module = $self->{_module};
    # Nothing waits and credit covers it: straight to the channel.
    if (!@{ $self->{_queue} } && $kind != ApmModule::K_HANDED && $kind != ApmModule::K_CLOSE) {
        if ($kind == ApmModule::K_HEAD) {
            $module->_send($kind, $self->{session_id}, $payload);
            return;
        }
        my $size = length $payload;
        if ($size <= $self->{_credit} && $size <= $module->{_max_frame}) {
            $module->_send($kind, $self->{session_id}, $payload);
            $self->{_credit} -= $size;
            return;
        }
    }
    push @{ $self->{_queue} }, [$kind, $payload, 0];
    $self->_pump;
}

# Moves queued writes to the channel as far as credit allows.
sub _pump {
    my ($self) = @_;
    my $module = $self->{_module};
    my $queue = $self->{_queue};
    while (@$queue && $self->{_open}) {
        my ($kind, undef, $offset) = @{ $queue->[0] };
        if ($kind == ApmModule::K_HEAD || $kind == ApmModule::K_CLOSE || $kind == ApmModule::K_HANDED) {
            $module->_send($kind, $self->{session_id}, $queue->[0][1]);
            shift @$queue;
            $self->_forget unless $kind == ApmModule::K_HEAD;
            next;
        }
        my $left = length($queue->[0][1]) - $offset;
        my $room = $module->{_max_frame} < $self->{_credit} ? $module->{_max_frame} : $self->{_credit};
        if ($left <= $room) {
            $module->_send($kind, $self->{session_id}, $offset ? substr($queue->[0][1], $offset) : $queue->[0][1]);
            $self->{_credit} -= $left;
            shift @$queue;
            next;
        }
        # Too big for one frame now: send the part credit allows. A WebSocket
        # message goes out as `more` fragments so that apm reassembles it;
        # bytes of a stream need no such marking.
        if ($kind == ApmModule::K_TEXT) {
            $room-- while $room > 0 && (ord(substr($queue->[0][1], $offset + $room, 1)) & 0xC0) == 0x80;
        }
        return if $room <= 0;
        my $lead = $self->{protocol} eq 'ws' && $kind != ApmModule::K_RAW ? ApmModule::K_MORE : $kind;
        $module->_send($lead, $self->{session_id}, substr($queue->[0][1], $offset, $room));
        $self->{_credit} -= $room;
        $queue->[0][2] = $offset + $room;
    }
}

sub _forget {
    my ($self) = @_;
    $self->{_open} = 0;
    $self->{_closing} = 1;
    $self->{_queue} = [];
    $self->{_partial} = '';
    delete $self->{_module}{_sessions}{ $self->{session_id} };
}

# apm moves the session to another instance: what the app queued goes out,
# then `handed`, and later writes are dropped.
sub _hand_off {
    my ($self) = @_;
    return if $self->{_closing}; # the app's close is on its way and ends the session instead
    $self->{_closing} = 1;
    $self->_enqueue(ApmModule::K_HANDED, '');
}

# An app callback died: end the session the way the client understands best.
sub _failed {
    my ($self) = @_;
    return if $self->{_closing};
    if ($self->{protocol} eq 'http' && !$self->{_started}) {
        $self->write("Internal Server Error\n", { 'x-status' => '500', 'content-type' => 'text/plain' });
    }
    if ($self->{protocol} eq 'ws') {
        $self->close(1011, 'internal error');
    } else {
        $self->close;
    }
}

1;
