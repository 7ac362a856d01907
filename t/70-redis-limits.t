#!/usr/bin/perl

# Two gateways on one Redis keep one set of limits: a workspace's and an
# org's requests per minute count across both, what a request used
# replaces what it reserved, limits one gateway learned from the
# provider are the other's too, and a workspace's daily budget is the
# fleet's.  A request that waits (ratepool_wait) waits for the fleet's
# room.  Far from a limit a gateway admits on a lease, and a burst
# across both still gets no more than the limit.  What Redis holds is under one hash tag, with no key, token
# or token hash in it.  Real redis-server, real nginx.

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA;
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
my $KEY3 = 'sk-ant-mock-r3-' . int(rand(1e9));
my $KEY4 = 'sk-ant-mock-r4-' . int(rand(1e9));

# a provider that tells its limits in its headers
my $teacher = $a->start_mock(port => 2, config => {
    keys => { $KEY4 => { org => 'taught', name => 'r4' } },
    orgs => { taught => { rpm => 100, itpm => 50000, otpm => 10000 } } });
my %TOKEN = map { $_ => "gw-$_-" . int(rand(1e9)) } qw(ci backend ops slow capped);

sub config {
    my ($t) = @_;

    return <<"EOF";
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=127.0.0.1:${\ $redis->port } redis_timeout=200ms;

    upstream claude {
        ratepool zone=llm;
        ratepool_org acme rpm=6;
        ratepool_key r1 org=acme server=127.0.0.1:${\ $mock->port } key=$KEY;
    }

    upstream mid {
        ratepool zone=llm;
        ratepool_org middle rpm=30;
        ratepool_key r3 org=middle server=127.0.0.1:${\ $mock->port } key=$KEY3;
    }

    upstream learnt {
        ratepool zone=llm;
        ratepool_key r4 org=taught server=127.0.0.1:${\ $teacher->port }
                     key=$KEY4;
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
    ratepool_workspace slow rpm=8;
    ratepool_client slow ${\ $t->token_hash($TOKEN{slow})};
    ratepool_workspace capped daily_tokens=1000;
    ratepool_client capped ${\ $t->token_hash($TOKEN{capped})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location /big/ {
            rewrite ^/big(/.*)\$ \$1 break;
            ratepool_pass http://big;
        }

        location /mid/ {
            rewrite ^/mid(/.*)\$ \$1 break;
            ratepool_pass http://mid;
        }

        location /learnt/ {
            rewrite ^/learnt(/.*)\$ \$1 break;
            ratepool_pass http://learnt;
        }

        location /wait/ {
            rewrite ^/wait(/.*)\$ \$1 break;
            ratepool_pass http://big;
            ratepool_wait 15s;
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

my $store = $a->status->{store};
is($store->{kind}, 'redis', 'status names the store: redis');
like($a->http(port => $a->port(0),
              path => '/ratepool/status?format=prometheus')->{body},
     qr/^ratepool_redis_up 1\n/m, 'Prometheus says so too');
is($store->{state}, 'up', 'Redis is up');
ok($store->{shared}, 'numbers are shared');
is($store->{gateways}, 2, 'both gateways are seen alive');

# --- one workspace limit for the fleet ---------------------------------------

my @codes;
push @codes, $a->messages(token => $TOKEN{ci})->{status} for 1 .. 2;
push @codes, $b->messages(token => $TOKEN{ci})->{status} for 1 .. 2;

is(join(',', @codes), '200,200,200,429',
    'a workspace of 3 rpm gets 3 requests across two gateways, not 6');

my $r = $b->messages(token => $TOKEN{ci});
my $err = eval { decode_json($r->{body}) } || {};
is($r->{status}, 429, 'the next one on the second gateway is refused too');
like($err->{error}{message}, qr/workspace "ci"/,
    'as the workspace\'s limit, in the provider\'s error format');
ok($r->{headers}{'retry-after'} >= 15, 'retry-after is the refill time')
    or diag explain $r->{headers};

is(scalar @{ $mock->log }, 3, 'the refused requests never reached the provider');

# --- one org limit for the fleet ---------------------------------------------

@codes = ();
push @codes, $a->messages(token => $TOKEN{backend})->{status} for 1 .. 2;
push @codes, $b->messages(token => $TOKEN{backend})->{status} for 1 .. 2;

is(join(',', @codes), '200,200,200,429',
    'the org of 6 rpm, 3 used, gives 3 more across both gateways');
is(scalar @{ $mock->log }, 6, 'the provider saw exactly the org\'s limit');

# parallel: the sum stays within the limit
$mock->reset;
my ($N, $t0) = (12);
my $par = $a->parallel($N, sub {
    my $t = $_[0] % 2 ? $a : $b;
    $t->messages(token => $TOKEN{backend}, path => '/big/v1/messages')
        ->{status};
});
is(scalar(grep { ($_ // 0) == 200 } @$par), $N,
    'a pool with room serves every request from both gateways');

# --- what was used replaces what was reserved ---------------------------------

# how many of a workspace's tokens per minute Redis counts as used now
sub missing {
    my ($dim, $limit) = @_;
    my ($sec, $usec) = split /\n/, $redis->cli('TIME');
    my $now = $sec * 1e6 + $usec;
    my $tat = $redis->cli('HGET', 'ratepool:{llm}:w:ops', $dim) || 0;
    return $tat > $now ? ($tat - $now) / 60e6 * $limit : 0;
}

$r = $a->messages(token => $TOKEN{ops}, path => '/big/v1/messages',
                  headers => [ 'x-mock-usage' =>
                      '{"input_tokens":5000,"output_tokens":700}' ]);
is($r->{status}, 200, 'a request that uses 5000 input and 700 output tokens');
sleep 0.2;
my ($in, $out) = (missing('i', 6000), missing('o', 6000));
ok($in > 4900 && $in <= 5000, sprintf('Redis charged its 5000 input tokens '
    . '(%.0f), not its estimate', $in));
ok($out > 600 && $out <= 700, sprintf('and its 700 output tokens (%.0f), '
    . 'not the 64 reserved', $out));

$r = $a->messages(token => $TOKEN{ops}, path => '/big/v1/messages',
                  body => { max_tokens => 3000 },
                  headers => [ 'x-mock-status' => 500 ]);
is($r->{status}, 500, 'a request that reserved 3000 output tokens fails');
sleep 0.2;
my $after = missing('o', 6000);
ok($after < $out, sprintf('the 3000 tokens it never used went back '
    . '(%.0f, was %.0f)', $after, $out));

# --- limits learned from the provider are shared -----------------------------

is($a->messages(token => $TOKEN{backend}, path => '/learnt/v1/messages')
   ->{status}, 200, 'an org of unknown limits answers with its limits');
is($redis->cli('HMGET', 'ratepool:{llm}:o:taught', 'Lr', 'Li', 'Lo'),
   "100\n50000\n10000\n", 'the gateway that learned them put them in Redis');

# --- budgets are the fleet's -------------------------------------------------

$r = $a->messages(token => $TOKEN{capped}, path => '/big/v1/messages',
                  headers => [ 'x-mock-usage' =>
                      '{"input_tokens":1500,"output_tokens":500}' ]);
is($r->{status}, 200, 'a workspace of 1000 tokens a day uses 2000 on one '
    . 'gateway');
sleep 0.2;
$r = $b->messages(token => $TOKEN{capped}, path => '/big/v1/messages');
$err = eval { decode_json($r->{body}) } || {};
is($r->{status}, 429, 'the other gateway refuses its next request');
is($err->{error}{details}{error_code} // '', 'enforced_spend_limit_reached',
    'as a spent budget');
# with Redis hung, a request that asked it would wait redis_timeout (200 ms)
$redis->pause;
$t0 = time;
$r = $b->messages(token => $TOKEN{capped}, path => '/big/v1/messages');
my $took_ms = (time - $t0) * 1000;
$redis->resume;
is($r->{status}, 429, 'and the one after');
ok($took_ms < 150, sprintf('knowing it without asking Redis (%.0f ms)',
                           $took_ms));

# --- waiting for room the fleet shares -----------------------------------------

# 8 rpm: one request every 7.5 s.  The second gateway's own buckets have
# room; Redis says the workspace is full, and when it has room again.
@codes = ();
push @codes, $a->messages(token => $TOKEN{slow}, path => '/wait/v1/messages')
    ->{status} for 1 .. 4;
push @codes, $b->messages(token => $TOKEN{slow}, path => '/wait/v1/messages')
    ->{status} for 1 .. 4;
is(join(',', @codes), join(',', (200) x 8),
    'a workspace of 8 rpm gets 8 at once from two gateways');

$t0 = time;
$r = $b->messages(token => $TOKEN{slow}, path => '/wait/v1/messages',
                  timeout => 20);
my $waited = time - $t0;
is($r->{status}, 200, 'the ninth waits (ratepool_wait) and is served');
ok($waited > 5 && $waited < 10,
    sprintf('once the fleet\'s workspace refilled (%.1f s)', $waited));

# --- the fast path keeps the limit too ---------------------------------------

# Far from a limit a gateway admits on its copy of Redis's buckets and
# sends the cost after; near it, every request asks.  A burst from both
# gateways at an org of 30 rpm gets 30, however they interleave.
my $fast = $a->status->{store}{fast};
my @seq = map {
    $a->messages(token => $TOKEN{backend}, path => '/big/v1/messages')
        ->{status}
} 1 .. 10;
is(join(',', @seq), join(',', (200) x 10), 'ten requests far from a limit');
ok($a->status->{store}{fast} - $fast >= 8,
    'most went on a lease, without a round trip to Redis ('
    . ($a->status->{store}{fast} - $fast) . ' of 10)');

$mock->reset;
$a->messages(token => $TOKEN{backend}, path => '/mid/v1/messages');
$b->messages(token => $TOKEN{backend}, path => '/mid/v1/messages');
$par = $a->parallel(40, sub {
    my $t = $_[0] % 2 ? $a : $b;
    $t->messages(token => $TOKEN{backend}, path => '/mid/v1/messages')
        ->{status};
});
my $t_burst = time;
my $served = 2 + grep { ($_ // 0) == 200 } @$par;
ok($served <= 31,
    "a burst across two gateways gets no more than the org's 30 rpm "
    . "($served served)");
is(scalar(grep { ($_ // 0) != 200 && ($_ // 0) != 429 } @$par), 0,
    'the rest got 429s');

# capacity a gateway leased and did not use goes back within a second;
# a gateway that was refused asks again once Redis said it may fit (2 s)
sleep 2.2;
my $later = 0;
for my $i (1 .. 10) {
    my $t = $i % 2 ? $a : $b;
    $later++ if $t->messages(token => $TOKEN{backend},
                             path => '/mid/v1/messages')->{status} == 200;
}
my $refill = int((time - $t_burst) * 30 / 60 + 1);
ok($served + $later >= 30 && $served + $later <= 30 + $refill,
    "then the rest of the 30 is served, leases given back "
    . "($served + $later, refill $refill)");
is(scalar @{ $mock->log }, $served + $later, 'and the provider saw no more');

# --- secrets stay out of Redis -----------------------------------------------

# what the limits above left in Redis: workspaces and orgs, usage,
# learned limits, a spent budget, a wait, leases
my @keys = split /\n/, $redis->cli('--scan');
ok(@keys >= 4, 'Redis holds the pool\'s state (' . scalar(@keys) . ' keys)');
is(scalar(grep { !/^ratepool:\{llm\}:/ } @keys), 0,
    'every key is under ratepool:{llm}: (one hash tag)');

my $dump = join "\n", @keys, map { $redis->cli('--no-raw', 'DUMP', $_) } @keys;
my @secrets = ($KEY, $KEY2, $KEY3, $KEY4, values %TOKEN,
               map { Digest::SHA::sha256_hex($_) }
                   $KEY, $KEY2, $KEY3, $KEY4, values %TOKEN);
is(scalar(grep { index($dump, $_) >= 0 } @secrets), 0,
    'no key, token or token hash in any Redis key name or value');
ok(grep({ $_ eq 'ratepool:{llm}:w:backend' } @keys),
    'workspaces are named by their configured name');

done_testing;
