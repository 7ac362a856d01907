#!/usr/bin/perl

# When Redis is not there: a Redis that hangs costs a request no more
# than redis_timeout, a Redis that lost the script is sent it again, a
# Redis killed under load leaves no request unanswered, and meanwhile
# each gateway keeps to its share of every limit (redis_fail=local) and
# says so once; when Redis comes back the gateways are on it again by
# themselves.  A wrong password is named in the error log, without the
# password, and redis_fail=closed answers 503.  Two gateways, real
# redis-server, real nginx.

use strict;
use warnings;

use lib 't/lib';

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $a = Ratepool::Test->new;
my $b = Ratepool::Test->new;

my $redis = $a->start_redis;
my $mock = $a->start_mock(port => 1, log => 1);

my $KEY = 'sk-ant-mock-r1-' . int(rand(1e9));
my $KEY2 = 'sk-ant-mock-r2-' . int(rand(1e9));
my %TOKEN = map { $_ => "gw-$_-" . int(rand(1e9)) } qw(ci backend ops half);

sub config {
    my ($t, %opt) = @_;
    my $server = $opt{server} // '127.0.0.1:' . $redis->port;
    my $extra = $opt{zone} // '';

    return <<"EOF";
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=$server redis_timeout=200ms
                  $extra;

    upstream claude {
        ratepool zone=llm;
        ratepool_org acme rpm=6;
        ratepool_key r1 org=acme server=127.0.0.1:${\ $mock->port } key=$KEY;
    }

    upstream big {
        ratepool zone=llm;
        ratepool_org wide rpm=1000;
        ratepool_key r2 org=wide server=127.0.0.1:${\ $mock->port } key=$KEY2;
    }

    ratepool_workspace ci rpm=3;
    ratepool_client ci ${\ $t->token_hash($TOKEN{ci})};
    ratepool_workspace backend rpm=1000 daily_tokens=100000;
    ratepool_client backend ${\ $t->token_hash($TOKEN{backend})};
    ratepool_workspace ops rpm=10 itpm=6000 otpm=6000;
    ratepool_client ops ${\ $t->token_hash($TOKEN{ops})};
    ratepool_workspace half rpm=8;
    ratepool_client half ${\ $t->token_hash($TOKEN{half})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location /big/ {
            rewrite ^/big(/.*)\$ \$1 break;
            ratepool_pass http://big;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF
}

$a->write_config(config($a));
$b->write_config(config($b));
$a->run;
$b->run;

ok(Ratepool::Test::redis_connected($a, $b), 'both gateways connect to Redis');

# --- Redis hangs ------------------------------------------------------------

# six requests: one of the two workers sees three of them time out,
# which opens its breaker
$redis->pause;
my (@slow, $t0);
$t0 = time;
for (1 .. 6) {
    my $t0 = time;
    my $status = $a->messages(token => $TOKEN{ops},
                              path => '/big/v1/messages',
                              timeout => 10)->{status};
    push @slow, [ $status, time - $t0 ];
}
$redis->resume;

is(join(',', map { $_->[0] } @slow), join(',', (200) x 6),
    'while Redis hangs, requests are decided without it (redis_fail=local)');
ok(!grep({ $_->[1] > 1 } @slow), 'none waits much past redis_timeout ('
    . join(', ', map { sprintf '%.2f s', $_->[1] } @slow) . ')');
ok($a->status->{store}{timeouts} >= 1, 'status counts the timeouts');
like($a->error_log, qr/redis at "127.0.0.1:\d+" is down: it did not answer in time/,
    'and the error log says Redis did not answer');
ok(Ratepool::Test::redis_connected($a, $b),
    'once Redis goes on, the gateways are back on it');

# --- NOSCRIPT after SCRIPT FLUSH ----------------------------------------------

my $fallbacks = $a->status->{store}{fallbacks};
$redis->cli('SCRIPT', 'FLUSH');
my $r = $a->messages(token => $TOKEN{backend}, path => '/big/v1/messages');
is($r->{status}, 200, 'after SCRIPT FLUSH the next request is served');
ok($a->status->{store}{noscript} >= 1, 'the script was sent again (noscript)');
is($a->status->{store}{fallbacks}, $fallbacks,
    'and not decided without Redis');

# --- Redis goes away ------------------------------------------------------------

# stopped under load: requests in flight, and more coming
my $logged = length $a->error_log;
my $pid = $redis->pid;
$t0 = time;
my $down = $a->parallel(13, sub {
    my ($i) = @_;

    if ($i == 0) {
        sleep 0.15;
        kill KILL => $pid;
        return 'killed';
    }

    sleep 0.03 * $i;
    my $t = $i % 2 ? $a : $b;
    $t->messages(token => $TOKEN{ops}, path => '/big/v1/messages',
                 headers => [ 'x-mock-delay-ms' => 100 ],
                 timeout => 10)->{status};
});
my $took = time - $t0;
$redis->stop;
shift @$down;

is(scalar(grep { ($_ // 0) != 200 && ($_ // 0) != 429 } @$down), 0,
    'Redis killed under load: every request is answered, 200 or 429 ('
    . join(',', map { $_ // 'none' } @$down) . ')');
ok($took < 3, sprintf('none hangs (%.2f s for all)', $took));

$down = $a->parallel(6, sub {
    $a->messages(token => $TOKEN{backend}, path => '/big/v1/messages',
                 timeout => 10)->{status};
});
is(scalar(grep { ($_ // 0) == 200 } @$down), 6,
    'with Redis gone, redis_fail=local serves a pool with room');

my $store = $a->status->{store};
is($store->{state}, 'down', 'status says Redis is down');
ok(!$store->{shared}, 'and that numbers are local');
is($store->{local_share}, 2, 'each gateway keeps half of every limit');

my @codes = map {
    $a->messages(token => $TOKEN{half}, path => '/big/v1/messages')->{status}
} 1 .. 6;
is(join(',', @codes), '200,200,200,200,429,429',
    'a workspace of 8 rpm gets 4 on one gateway while Redis is down');
is($b->messages(token => $TOKEN{half}, path => '/big/v1/messages')->{status},
    200, 'and the other gateway has its own 4');

my $log = substr $a->error_log, $logged;
my @said = $log =~ /redis at "127.0.0.1:\d+" is down/g;
is(scalar @said, 1, 'the error log says once that Redis is down');
like($log, qr/redis_fail=local/, 'and what applies meanwhile');

# --- and comes back -------------------------------------------------------------

$redis->start;

ok(Ratepool::Test::redis_connected($a, $b),
    'the gateways reconnect by themselves');
like($a->error_log, qr/redis at "127.0.0.1:\d+" is back/,
    'and says Redis is back');

$r = $a->messages(token => $TOKEN{ci});
is($r->{status}, 200, 'a request after the restart is served');
like($redis->cli('HGET', 'ratepool:{llm}:w:ci', 'r'), qr/^\d{10,}/,
    'and counted in Redis again');

# --- closed policy, wrong password ------------------------------------------

my $c = Ratepool::Test->new;
my $locked = $c->start_redis(password => 'right-' . int(rand(1e9)));
$c->write_file('redis.pass', 'wrong-horse-battery');
$c->write_config(config($c, server => '127.0.0.1:' . $locked->port,
    zone => "redis_fail=closed redis_password_file=redis.pass"));
$c->run;

my $deadline = time + 5;
while (time < $deadline) {
    last if $c->error_log =~ /is down/;
    sleep 0.1;
}

like($c->error_log, qr/refused the handshake: check redis_password_file=.*WRONGPASS/,
    'a wrong password gets a clear error log line');
unlike($c->error_log, qr/wrong-horse-battery/, 'that does not show the password');

$r = $c->messages(token => $TOKEN{backend}, path => '/big/v1/messages');
my $err = eval { decode_json($r->{body}) } || {};
is($r->{status}, 503, 'redis_fail=closed answers 503 while Redis is unusable');
is($err->{type}, 'error', 'in the provider\'s error format');
is($err->{error}{type}, 'api_error', 'as an api_error');
is($r->{headers}{'x-should-retry'}, 'true', 'that may be retried');

done_testing;
