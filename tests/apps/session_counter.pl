# The session hand-off test app (tests/it/sessions.rs), Perl flavour; it
# behaves as session_counter.py: each counter must be the last one plus 1,
# and the answer carries the running total, whichever instance gives it.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/../../connectors";

use ApmModule;

sub serve {
    my ($s) = @_;
    if ($s->{protocol} eq 'http') {
        $s->write("ok $$\n", { 'content-type' => 'text/plain' });
        $s->close;
        return;
    }
    $s->{session_data} = { last => 0, total => 0, rest => '' } unless $s->{migrated};
    my $answer = sub { $s->write($s->{protocol} eq 'tcp' ? "$_[0]\n" : $_[0]) };
    my $take = sub {
        my ($word) = @_;
        my $d = $s->{session_data};
        if ($word eq 'big') {
            my $kept = $d->{blob};
            $d->{blob} = 'x' x 100000;
            if (eval { $s->save_session_data; 1 }) {
                $answer->('big: saved');
            } else {
                (my $error = $@) =~ s/\s+\z//;
                $answer->("big: $error");
            }
            $d->{blob} = $kept;
            return;
        }
        if ($word !~ /\A[0-9]+\z/ || $word != $d->{last} + 1) {
            $answer->("gap $d->{last} $word");
            return;
        }
        $d->{last} = 0 + $word;
        $d->{total} += $word;
        $answer->("$d->{last} $d->{total} $$");
    };
    $s->{on_data} = sub {
        my ($data) = @_;
        my $d = $s->{session_data};
        if ($s->{protocol} eq 'ws') {
            $take->($data);
        } else {
            my @lines = split /\n/, $d->{rest} . $data, -1;
            $d->{rest} = pop @lines;
            $take->($_) for @lines;
        }
        $s->save_session_data;
    };
}

if ($ENV{NEVER_READY} && -e $ENV{NEVER_READY}) {
    sleep 1 while 1;
}
ApmModule->new(\&serve)->run;
