# The IPC test agent of tests/apps/ipc_agent.py (tests/it/ipc.rs), in Perl:
# the same commands on its control channel `ctl.<AGENT>`, the same environment.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/../../connectors";
use Time::HiRes qw(time sleep);

use ApmModule;

$| = 1;
my $name = $ENV{AGENT};
my $delay = $ENV{REPLY_DELAY_MS};
my @inbox;
my $current;

my $apm = ApmModule->new(sub {
    my ($s) = @_;
    $s->write("agent $name");
    $s->close;
});

sub track {
    my ($s) = @_;
    $current = $s;
    $s->{on_data} = sub {
        my ($data, $is_binary, $peer) = @_;
        push @inbox, { ev => 'data', data => $data, peer => defined $s->{peer_id} ? undef : $peer };
    };
    $s->{on_close} = sub { push @inbox, { ev => 'close' } };
    $s->{on_join} = sub { push @inbox, { ev => 'join', peer => $_[0] } };
    $s->{on_leave} = sub { push @inbox, { ev => 'leave', peer => $_[0] } };
}

my %commands = (
    send => sub { $apm->send($_[0]{channel}, $_[0]{data}); 'sent' },
    request => sub {
        my ($c) = @_;
        my $started = time;
        my $data = $apm->request($c->{channel}, $c->{data}, $c->{timeout});
        return { data => $data, ms => (time - $started) * 1000 };
    },
    inbox => sub { my @taken = @inbox; @inbox = (); \@taken },
    open => sub {
        my ($c) = @_;
        my $s = $apm->request_stream($c->{channel}, $c->{head}, $c->{timeout}) or return { ok => \0 };
        track($s);
        return { ok => \1 };
    },
    write => sub { $current && $current->write($_[0]{data}) ? \1 : \0 },
    close => sub { $current->close if $current; 'closed' },
);

$apm->{on_channel} = sub {
    my ($channel, $data, $reply) = @_;
    if ($channel eq "ctl.$name") {
        $reply->($commands{ $data->{do} }->($data));
        return;
    }
    push @inbox, { ev => 'msg', channel => $channel, data => $data };
    if ($reply && defined $delay) {
        # Said before the wait, so a test knows the request is pending here.
        print "agent $name: answering in $delay ms\n";
        sleep $delay / 1000;
        $reply->({ from => $name });
    }
};
$apm->{on_stream} = sub {
    my ($s) = @_;
    push @inbox, { ev => 'offer', peer => $s->{peer_id}, head => $s->{head} };
    if (defined $ENV{ACCEPT_STREAMS}) {
        track($s->accept);
    } else {
        $s->close;
    }
};
$apm->run;
