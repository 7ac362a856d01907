#!/usr/bin/perl

# ratepool_wait with Redis: a request that finds the fleet's workspace
# full waits for the fleet's room, not for its own gateway's, and is
# served once the workspace refilled in Redis.  Two gateways, real
# redis-server, real nginx.

use strict;
use warnings;

use lib 't/lib';

use Test::More;
use Time::HiRes qw(time);

use Ratepool::Test;

my $a = Ratepool::Test->new;
my $b = Ratepool::Test->new;

my $redis = $a->start_redis;
my $mock = $a->start_mock(port => 1, log => 1);

my $KEY2 = 'sk-ant-mock-r2-' . int(rand(1e9));
my %TOKEN = map { $_ => "gw-$_-" . int(rand(1e9)) } qw(slow);

sub config {
    my ($t) = @_;

    return <<"EOF";
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=127.0.0.1:${\ $redis->port } redis_timeout=200ms;

    upstream big {
        ratepool zone=llm;
        ratepool_org wide rpm=1000;
        ratepool_key r2 org=wide server=127.0.0.1:${\ $mock->port } key=$KEY2;
    }

    ratepool_workspace slow rpm=8;
    ratepool_client slow ${\ $t->token_hash($TOKEN{slow})};

    server {
        listen 127.0.0.1:%%PORT_0%%;

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

# --- waiting for room the fleet shares -----------------------------------------

# 8 rpm: one request every 7.5 s.  The second gateway's own buckets have
# room; Redis says the workspace is full, and when it has room again.
my @codes;
push @codes, $a->messages(token => $TOKEN{slow}, path => '/wait/v1/messages')
    ->{status} for 1 .. 4;
push @codes, $b->messages(token => $TOKEN{slow}, path => '/wait/v1/messages')
    ->{status} for 1 .. 4;
is(join(',', @codes), join(',', (200) x 8),
    'a workspace of 8 rpm gets 8 at once from two gateways');

my $t0 = time;
my $r = $b->messages(token => $TOKEN{slow}, path => '/wait/v1/messages',
                     timeout => 20);
my $waited = time - $t0;
is($r->{status}, 200, 'the ninth waits (ratepool_wait) and is served');
ok($waited > 5 && $waited < 10,
    sprintf('once the fleet\'s workspace refilled (%.1f s)', $waited));

done_testing;
