#!/usr/bin/perl

# ratepool_wait: a request that finds no room waits for it, up to a bound,
# instead of getting a 429; it goes the moment it fits, released at the
# refill rate; workspaces take turns; a request that cannot fit within
# the bound is answered at once; a client that leaves while it waits
# takes nothing; a full queue answers at once; other requests flow.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(8) }
          qw(a1 f1 q1);
my %TOKEN = map { $_ => "gw-$_-" . Ratepool::Test::random_hex(8) }
            qw(burst short heavy light other spent wa wb held);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => {
        $KEY{a1} => { org => 'org-a', name => 'a1' },
        $KEY{f1} => { org => 'org-f', name => 'f1' },
        $KEY{q1} => { org => 'org-q', name => 'q1' },
    },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format waits '\$ratepool_workspace \$status \$ratepool_wait_ms';
    access_log %%TESTDIR%%/waits.log waits;

    ratepool_zone llm:1m;

    upstream solo {
        ratepool zone=llm;
        ratepool_key a1 org=org-a server=127.0.0.1:%%PORT_1%% key=$KEY{a1};
    }

    upstream fair {
        ratepool zone=llm;
        ratepool_org org-f rpm=60;
        ratepool_key f1 org=org-f server=127.0.0.1:%%PORT_1%% key=$KEY{f1};
    }

    upstream small {
        ratepool zone=llm queue=2;
        ratepool_org org-q rpm=6;
        ratepool_key q1 org=org-q server=127.0.0.1:%%PORT_1%% key=$KEY{q1};
    }

    ratepool_workspace burst rpm=60;
    ratepool_workspace short rpm=6;
    ratepool_workspace heavy;
    ratepool_workspace light;
    ratepool_workspace other;
    ratepool_workspace spent daily_tokens=10;
    ratepool_workspace wa weight=2;
    ratepool_workspace wb;
    ratepool_workspace held otpm=1000;
    ratepool_client burst ${\ $t->token_hash($TOKEN{burst})};
    ratepool_client short ${\ $t->token_hash($TOKEN{short})};
    ratepool_client heavy ${\ $t->token_hash($TOKEN{heavy})};
    ratepool_client light ${\ $t->token_hash($TOKEN{light})};
    ratepool_client other ${\ $t->token_hash($TOKEN{other})};
    ratepool_client spent ${\ $t->token_hash($TOKEN{spent})};
    ratepool_client wa ${\ $t->token_hash($TOKEN{wa})};
    ratepool_client wb ${\ $t->token_hash($TOKEN{wb})};
    ratepool_client held ${\ $t->token_hash($TOKEN{held})};

    ratepool_wait 10s;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://solo;
        }

        location /nowait/v1/ {
            rewrite ^/nowait(/.*)\$ \$1 break;
            ratepool_pass http://solo;
            ratepool_wait 0;
        }

        location /brief/v1/ {
            rewrite ^/brief(/.*)\$ \$1 break;
            ratepool_pass http://solo;
            ratepool_wait 2s;
        }

        location /fair/v1/ {
            rewrite ^/fair(/.*)\$ \$1 break;
            ratepool_pass http://fair;
        }

        location /fairnow/v1/ {
            rewrite ^/fairnow(/.*)\$ \$1 break;
            ratepool_pass http://fair;
            ratepool_wait 0;
        }

        location /small/v1/ {
            rewrite ^/small(/.*)\$ \$1 break;
            ratepool_pass http://small;
        }

        location /smallnow/v1/ {
            rewrite ^/smallnow(/.*)\$ \$1 break;
            ratepool_pass http://small;
            ratepool_wait 0;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub ask {
    my ($who, $path, %opt) = @_;
    return $t->messages(token => $TOKEN{$who}, path => $path, %opt);
}

# runs $n requests at once; each returns [status, ms it took, retry-after]
sub burst {
    my ($n, $code) = @_;
    return $t->parallel($n, sub {
        my $t0 = time;
        my $r = $code->(@_);
        return [ $r->{status}, int((time - $t0) * 1000),
                 $r->{headers}{'retry-after'} ];
    });
}

sub drain {
    my ($who, $path) = @_;
    my $n = 0;
    $n++ while ask($who, $path)->{status} == 200 && $n < 200;
    return $n;
}

sub upstream_times {
    my ($key) = @_;
    return [ map { $_->{t_ms} } grep { ($_->{key_name} // '') eq $key }
             @{ $mock->log } ];
}

sub queue { $t->status->{pools}[$_[0]]{queue} }

# a burst larger than the workspace's room: every request is served, in
# turn, one a second as the workspace's bucket refills

is(drain('burst', '/nowait/v1/messages'), 60,
   'a workspace of 60 requests a minute takes 60 at once');
$mock->reset;

my $got = burst(4, sub { ask('burst', '/v1/messages') });

is_deeply([ map { $_->[0] } @$got ], [ 200, 200, 200, 200 ],
    'four more at once all get answers, none a 429');
my @times = sort { $a <=> $b } @{ upstream_times('a1') };
my @gaps = map { $times[$_] - $times[$_ - 1] } 1 .. $#times;
ok(@gaps == 3 && !grep({ $_ < 800 || $_ > 1300 } @gaps),
   'released a second apart, at the bucket\'s refill rate')
    or diag "gaps between releases: @gaps";

my $q = queue(0);
is($q->{waited}, 4, 'the status counts the requests that waited');
is($q->{served}, 4, 'and that were served');
is($q->{waiting}, 0, 'and none waits now');

my @logged = grep { /^burst 200 (\d+)$/ && $1 > 0 }
             split /\n/, $t->read_file('waits.log');
cmp_ok(scalar @logged, '>=', 3, '$ratepool_wait_ms says how long they waited');

# a wait that cannot be long enough is answered at once

is(drain('short', '/nowait/v1/messages'), 6,
   'a workspace of 6 requests a minute takes 6');
my $t0 = time;
my $r = ask('short', '/brief/v1/messages');
my $took = time - $t0;

is($r->{status}, 429, 'the next, which could go in 10 s, may wait 2 s');
ok($took < 0.5, 'and is told so at once, not after waiting')
    or diag "took $took s";
ok($r->{headers}{'retry-after'} >= 9 && $r->{headers}{'retry-after'} <= 12,
   'with the retry-after of its bucket')
    or diag "retry-after: $r->{headers}{'retry-after'}";

# a request that waited and still cannot fit when its wait is over gets
# its 429 then: the room it waited for is held by a long request

$got = $t->parallel(2, sub {
    my ($i) = @_;
    my $t0 = time;
    my $r = $i == 0
        ? ask('held', '/v1/messages', stream => 1,
              body => { max_tokens => 600, stream => JSON::PP::true },
              headers => [ 'x-mock-stream-delay-ms' => 250 ])
        : do { sleep 0.3;
               ask('held', '/brief/v1/messages',
                   body => { max_tokens => 600 }) };
    return [ $r->{status}, int((time - $t0) * 1000) ];
});

is($got->[0][0], 200, 'a long stream holds 600 of a workspace\'s 1000 '
   . 'output tokens');
is($got->[1][0], 429, 'a second request of 600 waits, and gets a 429');
ok($got->[1][1] >= 1000 && $got->[1][1] < 3500,
   'once its 2 s wait is over, or can no longer end in time')
    or diag "took $got->[1][1] ms";
is(queue(0)->{timed_out}, 1, 'the status counts it as timed out');

# budgets are not waited for

$mock->reset;
is(ask('spent', '/v1/messages', headers => [
       'x-mock-usage' => encode_json({ output_tokens => 50 }) ])->{status},
   200, 'a workspace uses up its daily budget');
$t0 = time;
$r = ask('spent', '/v1/messages');
ok($r->{status} == 429 && time - $t0 < 0.5,
   'the next request is refused at once: a budget is not waited for');

# workspaces take turns: one that queued many does not starve one that
# queued one

is(drain('other', '/fairnow/v1/messages'), 60,
   'the pool\'s org takes 60 requests at once');
$mock->reset;

$got = burst(6, sub {
    my ($i) = @_;
    sleep 0.3 if $i == 5;       # the light one comes last
    ask($i == 5 ? 'light' : 'heavy', '/fair/v1/messages');
});

is_deeply([ map { $_->[0] } @$got ], [ (200) x 6 ],
    'five heavy requests and one light one are all served');
my @heavy = sort { $a <=> $b } map { $_->[1] } @$got[0 .. 4];
ok($got->[5][1] < 2600 && $heavy[-1] > 4000,
   'the light one waited at most two turns, not behind all the heavy ones')
    or diag "light: $got->[5][1] ms, heavy: @heavy ms";

# after a cooldown, the waiting are released at the refill rate, not all
# at once: the 429 that began the cooldown emptied the org's bucket

$mock->reset;
$mock->script($KEY{f1}, [ { status => 429, retry_after => '1' } ]);
is(ask('other', '/fairnow/v1/messages')->{status}, 429,
   'a 429 from the provider cools the org down');

$got = burst(3, sub { ask('other', '/fair/v1/messages') });
is_deeply([ map { $_->[0] } @$got ], [ 200, 200, 200 ],
    'three requests wait through the cooldown and are served');
@times = sort { $a <=> $b } @{ upstream_times('f1') };
shift @times;       # the 429
@gaps = map { $times[$_] - $times[$_ - 1] } 1 .. $#times;
ok(@gaps == 2 && !grep({ $_ < 600 } @gaps),
   'not at once, but as the org\'s bucket refills, about a second apart')
    or diag "gaps between releases: @gaps";

# a workspace of weight 2 has two turns for one

drain('other', '/fairnow/v1/messages');
$got = burst(6, sub {
    my ($i) = @_;
    sleep 0.2 if $i >= 3;
    ask($i < 3 ? 'wa' : 'wb', '/fair/v1/messages');
});

my @order = map { $_->[1] < 3 ? 'wa' : 'wb' }
            sort { $a->[0] <=> $b->[0] }
            map { [ $got->[$_][1], $_ ] } 0 .. 5;
is(scalar(grep { $_ eq 'wa' } @order[0 .. 2]), 2,
   'of the first three served, two are of the workspace of weight 2')
    or diag "order: @order";

# a client that leaves while it waits takes nothing with it

is(drain('other', '/fairnow/v1/messages') <= 2, 1, 'the org is used up');
$mock->reset;

$r = ask('other', '/fair/v1/messages', timeout => 0.3);
is($r->{error}, 'timeout', 'a client gives up while it waits');
sleep 0.3;
is(queue(1)->{waiting}, 0, 'and leaves the queue');
sleep 1.2;
is(scalar @{ $mock->log }, 0, 'its request never reaches the provider');
is(ask('other', '/fair/v1/messages')->{status}, 200,
   'and the room it would have had goes to the next request');

# a reload while requests wait: the old worker serves them before it goes

drain('other', '/fairnow/v1/messages');
$got = $t->parallel(3, sub {
    my ($i) = @_;
    return $t->reload ? 'reloaded' : 'slow reload' if $i == 2;
    sleep 0.1 * $i;
    return ask('other', '/fair/v1/messages')->{status};
});

is_deeply($got, [ 200, 200, 'reloaded' ],
    'requests waiting across a reload are served');
is(queue(1)->{waiting}, 0, 'and nothing waits after it');

# a full queue answers at once; other requests flow meanwhile

is(drain('other', '/smallnow/v1/messages'), 6, 'a pool of 6 a minute');
$got = $t->parallel(4, sub {
    my ($i) = @_;
    if ($i == 3) {
        sleep 0.5;
        my $t0 = time;
        my $s = $t->http(port => $t->port(0), path => '/ratepool/status');
        my $ok = ask('heavy', '/v1/messages');
        return [ $s->{status}, $ok->{status}, int((time - $t0) * 1000) ];
    }
    sleep 0.1 * $i;
    my $t0 = time;
    my $r = ask('other', '/small/v1/messages', timeout => 3);
    return [ $r->{status} // 0, int((time - $t0) * 1000) ];
});

my @small = sort { $a->[1] <=> $b->[1] } @$got[0 .. 2];
is($small[0][0], 429, 'with two waiting, a third is refused');
ok($small[0][1] < 500, 'at once');
ok($got->[3][0] == 200 && $got->[3][1] == 200 && $got->[3][2] < 500,
   'while they wait, the status and another pool answer at once')
    or diag explain $got->[3];

# the queue's room is shared by workspaces: one that filled it gives up
# its newest place to another workspace's first request, answered 429 at
# once; the newcomer waits in its place, and its second request, which
# would take more than its share, is refused

my $evicted = queue(2)->{evicted};
my %sent;
$got = $t->parallel(4, sub {
    my ($i) = @_;
    my ($who, $at) = @{ [ [other => 0], [other => 0.2], [light => 0.8],
                          [light => 1.4] ]->[$i] };
    sleep $at;
    my $t0 = time;
    my $r = ask($who, '/small/v1/messages', timeout => 2.5);
    return [ $who, $r->{status} // 0, int((time - $t0) * 1000) ];
});

my @other = grep { $_->[0] eq 'other' } @$got;
my @light = grep { $_->[0] eq 'light' } @$got;
my ($gave) = grep { $_->[1] == 429 } @other;
ok($gave && $gave->[2] < 1400,
   'a workspace that holds the whole queue gives a place up to another '
   . 'workspace: its newest request is answered 429 when the other comes')
    or diag explain $got;
is(scalar(grep { $_->[1] == 429 } @other), 1, 'one of its requests only');
ok($light[0][1] != 429 && $light[0][2] >= 2000,
   'the other workspace\'s first request waits in its place')
    or diag explain $got;
ok($light[1][1] == 429 && $light[1][2] < 500,
   'its second, past its share of the queue, is refused at once')
    or diag explain $got;
is(queue(2)->{evicted} - $evicted, 1, 'the status counts the place given up');
like($t->error_log, qr/a request of workspace "other" gave up its place in the full queue of pool "small"/,
     'and the log says so');

$t->stop;
$t->check_log;

done_testing;
