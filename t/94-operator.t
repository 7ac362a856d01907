#!/usr/bin/perl

# What an operator is shown is what happened: each try's upstream status
# as the provider sent it (a 401, 403 or 529 moved on is not logged as a
# 429), 401, 403 and 529 counted apart, each key's state as a gauge, what
# clients were answered, how long requests waited, the budgets in use,
# and the last minutes of requests and 429s that the status page draws.

use strict;
use warnings;

use lib 't/lib';

use List::Util qw(sum);
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;

my %KEY = map { $_ => "sk-ant-mock-$_-" . int(rand(1e9)) }
          qw(d1 d2 r1 r2 o1 o2 w1);
my $TOKEN = 'gw-operator-' . int(rand(1e9));
my $BOB = 'gw-operator-bob-' . int(rand(1e9));
my $UNNAMED = 'gw-operator-ci-' . int(rand(1e9));

my $mock = $t->start_mock(port => 1);
my $fallback = $t->start_mock(port => 2);

sub key_line {
    my ($name, $org, @more) = @_;
    my $port = "@more" =~ /fallback/ ? '%%PORT_2%%' : '%%PORT_1%%';
    return "ratepool_key $name org=$org server=127.0.0.1:$port "
           . "key=$KEY{$name} @more;";
}

$t->write_config(<<"EOF2");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format tries '\$request_uri tries=\$ratepool_tries '
                     'up=\$upstream_status status=\$status '
                     'client=\$ratepool_client session=\$ratepool_session';
    access_log %%TESTDIR%%/access.log tries;

    ratepool_zone llm:1m;

    upstream dead {
        ratepool zone=llm;
        ${\ key_line('d1', 'od1') }
        ${\ key_line('d2', 'od2') }
    }

    upstream refuse {
        ratepool zone=llm;
        ${\ key_line('r1', 'or1') }
        ${\ key_line('r2', 'or2') }
    }

    upstream over {
        ratepool zone=llm;
        ${\ key_line('o1', 'oo1') }
        ${\ key_line('o2', 'oo2', 'fallback=1') }
    }

    upstream waits {
        ratepool zone=llm;
        ${\ key_line('w1', 'ow1') }
    }

    ratepool_workspace team daily_tokens=100000;
    ratepool_client team ${\ $t->token_hash($TOKEN)} name=alice;
    ratepool_client team ${\ $t->token_hash($BOB)} name=bob;
    ratepool_client team ${\ $t->token_hash($UNNAMED)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /dead/v1/ {
            rewrite ^/dead(/.*)\$ \$1 break;
            ratepool_pass http://dead;
            ratepool_wait 5s;
        }

        location /refuse/v1/ {
            rewrite ^/refuse(/.*)\$ \$1 break;
            ratepool_pass http://refuse;
            ratepool_wait 5s;
        }

        location /over/v1/ {
            rewrite ^/over(/.*)\$ \$1 break;
            ratepool_pass http://over;
            ratepool_wait 5s;
        }

        location /waits/v1/ {
            rewrite ^/waits(/.*)\$ \$1 break;
            ratepool_pass http://waits;
            ratepool_wait 5s;
        }


        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF2

$t->run;

sub ask {
    my ($pool, %args) = @_;
    return $t->messages(token => $TOKEN, path => "/$pool/v1/messages",
                        %args);
}

sub prom {
    my %sample;

    my $r = $t->http(port => $t->port(0),
                     path => '/ratepool/status?format=prometheus');

    for (split /\n/, $r->{body}) {
        $sample{$1} = $2 if /^([^#]\S*) (\S+)$/;
    }

    return \%sample;
}

sub pool_of {
    my ($status, $name) = @_;
    return (grep { $_->{name} eq $name } @{ $status->{pools} })[0];
}

sub key_of {
    my ($status, $pool, $name) = @_;
    return Ratepool::Test::by_name(pool_of($status, $pool)->{keys})->{$name};
}

my $t0 = time;

# each refusing key is scripted for good; the request moves on once
$mock->script($KEY{d1}, [ { status => 401 } ], sticky => 1);
$mock->script($KEY{r1}, [ { status => 403 } ], sticky => 1);
$mock->script($KEY{o1}, [ { status => 529 } ], sticky => 1);

my %codes;
for my $pool (qw(dead refuse)) {
    $codes{$pool} = join ',', map { ask($pool)->{status} } 1 .. 4;
}
$codes{over} = ask('over')->{status};

is($codes{dead}, '200,200,200,200', 'a dead key is hidden from clients');
is($codes{refuse}, '200,200,200,200', 'so is a refusing one');
is($codes{over}, 200, 'and an overloaded provider');

sub wait_log {
    my ($re) = @_;

    # nginx logs a request just after its answer
    for (1 .. 50) {
        last if $t->access_log =~ $re;
        sleep 0.05;
    }

    return $t->access_log;
}

my $log = wait_log(qr{^/over/}m);
like($log, qr{^/dead/v1/messages tries=2 up=401, 200 status=200 }m,
    'the access log shows the 401 that moved the request on, as sent');
like($log, qr{^/refuse/v1/messages tries=2 up=403, 200 status=200 }m,
    'and the 403');
like($log, qr{^/over/v1/messages tries=2 up=529, 200 status=200 }m,
    'and the 529');
unlike($log, qr{up=429}, 'no try is logged as a 429 it was not');

my $status = $t->status;
my $d1 = key_of($status, 'dead', 'd1');
is($d1->{state}, 'dead', 'the dead key is shown dead');
is($d1->{responses}{401}, 1, 'with its 401 counted apart');
is($d1->{responses}{other}, 0, 'and not among the others');
ok($d1->{dead_since} >= int($t0) && $d1->{dead_since} <= time + 1,
    'since when it is dead');
is(key_of($status, 'refuse', 'r1')->{responses}{403}, 1,
    'a 403 is counted apart');
is(key_of($status, 'refuse', 'r1')->{state}, 'refused',
    'and its key is refused for a while');
is(key_of($status, 'over', 'o1')->{responses}{529}, 1, 'so is a 529');
is(key_of($status, 'dead', 'd2')->{dead_since}, 0,
    'a live key has no such time');

my $p = prom();
is($p->{'ratepool_key_responses_total{pool="dead",key="d1",status="401"}'},
    1, 'Prometheus counts the 401');
is($p->{'ratepool_key_responses_total{pool="refuse",key="r1",'
        . 'status="403"}'}, 1, 'and the 403');
is($p->{'ratepool_key_responses_total{pool="over",key="o1",status="529"}'},
    1, 'and the 529');
is($p->{'ratepool_key_state{pool="dead",key="d1",org="od1",state="dead"}'},
    1, 'the key-state gauge says which key is dead');
is($p->{'ratepool_key_state{pool="dead",key="d1",org="od1",state="ok"}'},
    0, 'and only that');
is($p->{'ratepool_key_state{pool="dead",key="d2",org="od2",state="ok"}'},
    1, 'the other key is ok');
is($p->{'ratepool_key_state{pool="refuse",key="r1",org="or1",'
        . 'state="refused"}'}, 1, 'the refusing key is refused');
is($p->{'ratepool_key_tokens_total{pool="dead",key="d2",org="od2",'
        . 'kind="input"}'},
    key_of($status, 'dead', 'd2')->{tokens}{input},
    'tokens are counted per key, as in the JSON');

# what the clients got: a 500 passed on, and a 429 that no key could hide
is(ask('dead', headers => [ 'x-mock-status' => 500 ])->{status}, 500,
    'a provider\'s 500 reaches the client');
my $r = ask('refuse', headers => [ 'x-mock-status' => 429,
                                   'x-mock-retry-after' => 30 ]);
is($r->{status}, 429, 'a 429 no key can hide reaches it too');

# a request that waits: its only key answers 429 for a second first
$mock->script($KEY{w1}, [ { status => 429, retry_after => '1' } ]);
is(ask('waits')->{status}, 200, 'a request waited for its key');

$status = $t->status;
$p = prom();

my $dead = pool_of($status, 'dead')->{answers};
is($dead->{'2xx'}, 4, 'the pool\'s answers: 4 of 2xx');
is($dead->{'5xx'}, 1, 'and the 500');
is(pool_of($status, 'refuse')->{answers}{429}, 1,
    'the other pool gave its 429');
is($p->{'ratepool_pool_answers_total{pool="refuse",status="429"}'}, 1,
    'Prometheus says so too');

is($p->{'ratepool_pool_wait_seconds_count{pool="waits"}'}, 1,
    'the wait is in the wait histogram');
ok($p->{'ratepool_pool_wait_seconds_sum{pool="waits"}'} >= 0.9,
    'with its length, about the retry-after');
is($p->{'ratepool_pool_wait_seconds_bucket{pool="waits",le="0.500"}'}, 0,
    'in its bucket');
is($p->{'ratepool_pool_wait_seconds_count{pool="dead"}'}, 0,
    'requests that did not wait are not in it');
is($p->{'ratepool_pool_added_seconds_count{pool="dead"}'}, 5,
    'every answered request is in the added-time histogram');
is($p->{'ratepool_pool_added_seconds_bucket{pool="dead",le="+Inf"}'}, 5,
    'whose last bucket holds them all');

my $ws = Ratepool::Test::by_name($status->{workspaces})->{team};
is($p->{'ratepool_workspace_budget_tokens{workspace="team",'
        . 'period="day"}'}, 100000, 'the day\'s budget is a gauge');
is($p->{'ratepool_workspace_budget_used_tokens{workspace="team",'
        . 'period="day"}'}, $ws->{tokens_today}, 'and its use');
ok($ws->{tokens_today} > 0, 'which is not nothing');

# the last minutes, for the page: the counts add up to the totals
my $h = $status->{history};
is($h->{step_sec}, 10, 'history in steps of 10 s');
is(scalar @{ $h->{requests} }, 60, 'for the last 10 minutes');
is(sum(@{ $h->{requests} }), $status->{totals}{requests},
    'every request is in it');
is(sum(@{ $h->{rerouted} }), $status->{totals}{rerouted},
    'and every request sent again');
is(sum(@{ $h->{given_429} }), 1, 'the one 429 given');
is(sum(@{ $h->{errors} }), 1, 'and the one error');
is(sum(@{ $h->{upstream_429} }),
    sum(map { $_->{responses}{429} } map { @{ $_->{keys} } }
        @{ $status->{pools} }),
    'and the provider\'s 429s, hidden or not');
ok(abs($status->{now} - time) < 2, 'the status says what time it is');

# a browser gets the page, anything else the JSON
$r = $t->http(port => $t->port(0), path => '/ratepool/status',
              headers => [ Accept => 'text/html,application/xhtml+xml' ]);
like($r->{headers}{'content-type'}, qr{^text/html}, 'a browser gets a page');
like($r->{headers}{'content-security-policy'}, qr{default-src 'none'},
    'that may load nothing from elsewhere');
like($r->{body}, qr{<html}i, 'which is HTML');
$r = $t->http(port => $t->port(0), path => '/ratepool/status?format=json',
              headers => [ Accept => 'text/html' ]);
like($r->{body}, qr/^\{"version"/, 'the page\'s own poll gets the JSON');
$r = $t->http(port => $t->port(0),
              path => '/ratepool/status?format=html');
like($r->{headers}{'content-type'}, qr{^text/html}, 'so does ?format=html');

# people and jobs: each token's name, counted apart, in the log too
my $session = '5a1e2b3c-0d4e-4f5a-8b6c-7d8e9f0a1b2c';
is($t->messages(token => $BOB, path => '/dead/v1/messages',
                headers => [ 'x-claude-code-session-id' => $session ])
     ->{status}, 200, 'bob, from a Claude Code session');
$t->messages(token => $BOB, path => '/dead/v1/messages',
             headers => [ 'x-claude-code-session-id' => 'a b"c' ]);
is($t->messages(token => $UNNAMED, path => '/dead/v1/messages')->{status},
    200, 'and a token without a name');

my $hash = substr($t->token_hash($UNNAMED), 0, 19);
$log = wait_log(qr/client=\Q$hash\E/);
like($log, qr{ status=200 client=alice session=-$}m, 'alice is in the log');
like($log, qr{ client=bob session=\Q$session\E$}m,
    'bob is, with his session id');
like($log, qr{ client=bob session=-$}m,
    'an id that is not a plain id is left out');
like($hash, qr/^sha256:[0-9a-f]{12}$/, 'an unnamed token is known by');
like($log, qr{ client=\Q$hash\E session=-$}m,
    'its hash\'s first digits, as in nginx.conf');
unlike($log, qr{\Q$TOKEN\E|\Q$BOB\E|\Q$UNNAMED\E}, 'no token is in the log');

$status = $t->status;
my $clients = Ratepool::Test::by_name($status->{clients});
is(scalar keys %$clients, 3, 'the status shows the three clients');
is($clients->{bob}{requests}, 2, 'bob\'s requests');
is($clients->{bob}{workspace}, 'team', 'and his workspace');
is($clients->{$hash}{requests}, 1, 'the unnamed token\'s');
is($clients->{alice}{requests},
    $status->{totals}{requests} - 3, 'and alice\'s, all the others');
is($clients->{alice}{given_429}, 1, 'alice got the 429');
my $ws_used = Ratepool::Test::by_name($status->{workspaces})->{team}{tokens};
is(sum(map { $_->{tokens}{input} } values %$clients), $ws_used->{input},
    'the clients\' tokens add up to their workspace\'s');
ok($clients->{bob}{tokens}{output} > 0, 'bob used some');

$p = prom();
is($p->{'ratepool_client_requests_total{client="bob",workspace="team"}'}, 2,
    'Prometheus counts bob\'s requests');
is($p->{'ratepool_client_tokens_total{client="bob",workspace="team",'
        . 'kind="output"}'}, $clients->{bob}{tokens}{output},
    'and his tokens');

$t->check_log;

done_testing;
