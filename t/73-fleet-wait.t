#!/usr/bin/perl

# A fleet waits without 429s: two gateways on one Redis, ratepool_wait,
# and clients asking more of an org than it refills.  Their waiting
# requests wake together when they think the org has room; Redis lets
# one of them go, and the provider is not sent what it will refuse.
# Real redis-server, real nginx, a mock that enforces the org's buckets.

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

my $KEY = 'sk-ant-mock-w1-' . Ratepool::Test::random_hex(8);
my $TOKEN = 'gw-fleet-' . Ratepool::Test::random_hex(8);

# 6,000 input tokens a minute (100 a second), learned from its answers
my $mock = $a->start_mock(port => 1, log => 1, config => {
    keys => { $KEY => { org => 'org-w', name => 'w1' } },
    orgs => { 'org-w' => { rpm => 6000, itpm => 6000, otpm => 1000000 } },
});

for my $t ($a, $b) {
    $t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=127.0.0.1:${\ $redis->port }
                  redis_timeout=100ms redis_fail=local;

    upstream claude {
        ratepool zone=llm;
        ratepool_key w1 org=org-w server=127.0.0.1:${\ $mock->port }
                     key=$KEY;
    }

    ratepool_workspace ci;
    ratepool_client ci ${\ $t->token_hash($TOKEN)};

    ratepool_wait 20s;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            access_log off;
            ratepool_status;
        }
    }
}
EOF
    $t->run;
}

ok(Ratepool::Test::redis_connected($a, $b), 'both gateways use Redis');

# six clients, three a gateway, sending requests of about 100 tokens as
# fast as they are answered for 12 s: the minute's worth of room the org
# starts with goes in a few seconds, then one request a second fits

my $start = time;
my $results = $a->parallel(6, sub {
    my ($i) = @_;
    my $gw = $i % 2 ? $b : $a;
    my %n = (served => 0, refused => 0, other => 0);

    while (time < $start + 12) {
        my $r = $gw->messages(token => $TOKEN, timeout => 30, body => {
            max_tokens => 16,
            messages => [ { role => 'user', content => 'x' x 300 } ] });
        $r->{status} == 200 ? $n{served}++
        : $r->{status} == 429 ? $n{refused}++ : $n{other}++;
    }
    return \%n;
});

my %total;
for my $n (@$results) {
    $total{$_} += $n->{$_} for keys %$n;
}

my @log = @{ $mock->log };
my $upstream_429 = grep { $_->{status} == 429 } @log;

cmp_ok($total{served}, '>=', 60, 'the org\'s room is used')
    or diag explain \%total;
is($total{refused}, 0, 'no client is answered 429: they wait');
is($total{other}, 0, 'nor anything else');
ok($upstream_429 <= $total{served} / 20,
   'the provider refuses fewer than 5 in 100 of what the fleet sends')
    or diag "$upstream_429 refused upstream, $total{served} served";

$a->check_log;
$b->check_log;

done_testing;
