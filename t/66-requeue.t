#!/usr/bin/perl

# Waiting keeps its promise: with ratepool_wait, a request that every key
# refused with a 429 after it was sent goes back into the queue with the
# deadline it had when it arrived, and is sent again (the same method and
# body) when a key has room, instead of reaching its client as a 429.  Its
# workspace is charged for it once; a client that leaves meanwhile takes
# nothing; an error page for 429 (a fallback pool) is taken at once
# instead.  With the shared-memory store and with a real Redis.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;
my $rt = Ratepool::Test->new;

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(8) }
          qw(r1 r2 f1);
my $TOKEN = 'gw-ci-' . Ratepool::Test::random_hex(8);
my $OTHER = 'gw-other-' . Ratepool::Test::random_hex(8);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => {
        $KEY{r1} => { org => 'org-r1', name => 'r1' },
        $KEY{r2} => { org => 'org-r2', name => 'r2' },
        $KEY{f1} => { org => 'org-f', name => 'f1' },
    },
});
my $redis = $rt->start_redis;

sub config {
    my ($gw, $zone) = @_;
    my $port = $mock->port;

    return <<"EOF";
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format tries '\$status \$ratepool_tries "\$upstream_status"';
    access_log %%TESTDIR%%/tries.log tries;

    ratepool_zone $zone;

    upstream two {
        ratepool zone=llm;
        ratepool_key r1 org=org-r1 server=127.0.0.1:$port key=$KEY{r1};
        ratepool_key r2 org=org-r2 server=127.0.0.1:$port key=$KEY{r2};
        keepalive 4;
    }

    upstream fallback {
        ratepool zone=llm;
        ratepool_key f1 org=org-f server=127.0.0.1:$port key=$KEY{f1};
    }

    ratepool_workspace ci rpm=3;
    ratepool_client ci ${\ $gw->token_hash($TOKEN)};
    ratepool_workspace other;
    ratepool_client other ${\ $gw->token_hash($OTHER)};

    ratepool_wait 10s;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://two;
        }

        location /nowait/v1/ {
            rewrite ^/nowait(/.*)\$ \$1 break;
            ratepool_pass http://two;
            ratepool_wait 0;
        }

        location /brief/v1/ {
            rewrite ^/brief(/.*)\$ \$1 break;
            ratepool_pass http://two;
            ratepool_wait 3s;
        }

        location /fb/v1/ {
            rewrite ^/fb(/.*)\$ \$1 break;
            ratepool_pass http://two;
            proxy_intercept_errors on;
            error_page 429 = \@fallback;
        }

        location \@fallback {
            ratepool_pass http://fallback;
        }

        location = /ratepool/status {
            access_log off;
            ratepool_status;
        }
    }
}
EOF
}

$t->write_config(config($t, 'llm:1m'));
$t->run;

$rt->write_config(config($rt, 'llm:1m redis=127.0.0.1:' . $redis->port
                              . ' redis_timeout=200ms'));
$rt->run;

# no key cooling, and a request in each org's bucket (a 429 empties it)
sub keys_ok {
    my ($gw) = @_;
    for (1 .. 100) {
        my $two = by_two($gw->status);
        return 1 unless grep({ $_->{state} ne 'ok' } @{ $two->{keys} })
                        || grep({ $_->{rpm_limit} && $_->{rpm_available} < 1 }
                                @{ $two->{orgs} });
        sleep 0.1;
    }
    return 0;
}

sub last_logged {
    my ($gw) = @_;
    my @lines = split /\n/, $gw->read_file('tries.log');
    return $lines[-1] // '';
}

for my $gw ([ 'shared memory', $t ], [ 'Redis', $rt ]) {
    my ($store, $g) = @$gw;

    # both orgs refuse the request once: it waits out their cooldown and
    # is sent again

    $mock->reset;
    $mock->script($KEY{$_}, [ { status => 429, retry_after => '1' } ])
        for qw(r1 r2);

    my $before = $g->status;
    my $body = { max_tokens => 32, messages => [
                 { role => 'user', content => "requeue me ($store)" } ] };
    my $t0 = time;
    my $r = $g->messages(token => $TOKEN, body => $body);
    my $took = time - $t0;
    my $after = $g->status;
    my @log = @{ $mock->log };

    is($r->{status}, 200, "$store: a request both keys refused is served");
    cmp_ok($took, '>=', 0.9, "$store: once their cooldown was over");
    is(scalar @log, 3, "$store: sent three times in all")
        or diag explain [ map { "$_->{key_name} $_->{status}" } @log ];
    is_deeply([ sort map { $_->{key_name} } @log[0, 1] ], [ 'r1', 'r2' ],
        "$store: first to both keys");
    is_deeply([ map { $_->{method} } @log ], [ ('POST') x 3 ],
        "$store: as a POST every time");
    is(scalar(grep { $_->{body} eq $log[0]{body} } @log), 3,
        "$store: with the same body every time");
    like($log[0]{body}, qr/requeue me/, "$store: the client's body");

    is(by_two($after)->{queue}{requeued} - by_two($before)->{queue}{requeued},
       1, "$store: status counts it as requeued");
    is(ws($after, 'ci')->{admitted} - ws($before, 'ci')->{admitted},
       1, "$store: the workspace counts one request");
    my $prom = $g->http(port => $g->port(0),
                        path => '/ratepool/status?format=prometheus')->{body};
    like($prom, qr/^ratepool_pool_requeued_total\{pool="two"\} 1$/m,
         "$store: and so does Prometheus");
    is($after->{totals}{in_flight}, 0, "$store: nothing is left in flight");
    like(last_logged($g), qr/^200 3 "429, 429 : 200"$/,
         "$store: the log shows its three tries, a round each side of its "
         . "wait")
        or diag last_logged($g);

    # the workspace's rpm=3 bucket lost one request to it, not three

    sleep 0.2;      # Redis: what was given back is sent in batches
    my @statuses = map {
        $g->messages(token => $TOKEN, path => '/nowait/v1/messages')->{status}
    } 1 .. 2;
    is_deeply(\@statuses, [ 200, 200 ],
        "$store: its workspace has two of its three requests a minute left");

    # without ratepool_wait, the 429 reaches the client

    ok(keys_ok($g), "$store: the keys are ok again");
    $mock->reset;
    $mock->script($KEY{$_}, [ { status => 429, retry_after => '1' } ])
        for qw(r1 r2);

    $r = $g->messages(token => $OTHER, path => '/nowait/v1/messages');
    is($r->{status}, 429, "$store: without ratepool_wait the client gets it");
    cmp_ok($r->{headers}{'retry-after'}, '>=', 1,
        "$store: with the pool's retry-after");
}

# a request keeps its first deadline, however often it goes back: keys
# that refuse everything end it within its ratepool_wait of 3 s

ok(keys_ok($t), 'the keys are ok again');

$mock->reset;
$mock->script($KEY{$_}, [ { status => 429, retry_after => '1' } ], sticky => 1)
    for qw(r1 r2);

my $before = $t->status;
my $t0 = time;
my $r = $t->messages(token => $OTHER, path => '/brief/v1/messages',
                     timeout => 15);
my $took = time - $t0;
my $after = $t->status;
my $requeued = by_two($after)->{queue}{requeued}
               - by_two($before)->{queue}{requeued};

is($r->{status}, 429, 'keys that refuse everything: the client gets a 429');
ok($took >= 0.9 && $took < 4.5,
   'within its ratepool_wait of 3 s, counted from its arrival')
    or diag "answered after $took s";
cmp_ok($requeued, '>=', 1, 'after it went back to wait at least once');
cmp_ok(scalar @{ $mock->log }, '>=', $requeued + 1,
    'and was sent again each time');
is($after->{totals}{in_flight}, 0, 'nothing is left in flight');
is(by_two($after)->{queue}{waiting}, 0, 'nor waiting');

# a client that leaves while it waits again takes nothing, and its
# request is not sent again

ok(keys_ok($t), 'the keys are ok again');

$mock->reset;
$mock->script($KEY{$_}, [ { status => 429, retry_after => '2' } ])
    for qw(r1 r2);

$before = $t->status;
$r = $t->messages(token => $OTHER, timeout => 0.6);
sleep 2.5;
$after = $t->status;

ok($r->{error}, 'the client left before it was served');
is(scalar @{ $mock->log }, 2, 'its request was not sent again');
is(by_two($after)->{queue}{requeued} - by_two($before)->{queue}{requeued},
   1, 'it had gone back to wait');
is(by_two($after)->{queue}{waiting}, 0, 'it waits no more');
is($after->{totals}{in_flight}, 0, 'nothing is left in flight');
is(ws($after, 'other')->{reserved_input_tokens}, 0,
   'its workspace holds nothing for it');

# an error page for 429 is the user's fallback: taken at once

ok(keys_ok($t), 'the keys are ok again');
$mock->reset;
$mock->script($KEY{$_}, [ { status => 429, retry_after => '5' } ])
    for qw(r1 r2);

$before = $t->status;
$t0 = time;
$r = $t->messages(token => $OTHER, path => '/fb/v1/messages');
$took = time - $t0;
$after = $t->status;

is($r->{status}, 200, 'with an error page for 429 the fallback serves it');
cmp_ok($took, '<', 1, 'at once');
is_deeply([ sort map { $_->{key_name} } @{ $mock->log } ], [ 'f1', 'r1', 'r2' ],
    'after both keys of the pool refused it');
is(by_two($after)->{queue}{requeued}, by_two($before)->{queue}{requeued},
   'it did not go back to wait');

$t->check_log;
$rt->check_log;

done_testing;


sub by_two {
    my ($status) = @_;
    return Ratepool::Test::by_name($status->{pools})->{two};
}

sub ws {
    my ($status, $name) = @_;
    return Ratepool::Test::by_name($status->{workspaces})->{$name};
}
