#!/usr/bin/perl

# A Redis that restarts empty learns the workspaces' budgets back from the
# gateways, as it learns the orgs' state (t/74).
#
# A reload is the operator's way out of a cooldown longer than a provider
# asks for (a retry-after years ahead, kept as an hour), on a fleet too:
# the reload ends it in Redis, where every gateway reads it, as well as
# in the gateway's zone, so the org is used again at once.  Before, Redis
# gave the hour back to the reloaded gateway with its next answer.  Real
# redis-server, real nginx.

use strict;
use warnings;

use lib 't/lib';

use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;
my $redis = $t->start_redis;

my %KEY = map { $_ => "sk-ant-mock-$_-" . Ratepool::Test::random_hex(8) }
          qw(a1 b1);
my $TOKEN = 'gw-reload-' . Ratepool::Test::random_hex(8);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { map { $KEY{$_} => { org => "org-$_", name => $_ } } keys %KEY },
    orgs => { map { ("org-$_" => { rpm => 10000 }) } keys %KEY },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=127.0.0.1:${\ $redis->port }
                  redis_timeout=200ms;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-a rpm=10000;
        ratepool_org org-b rpm=10000;
        ratepool_key a1 org=org-a server=127.0.0.1:${\ $mock->port }
                     key=$KEY{a1};
        ratepool_key b1 org=org-b server=127.0.0.1:${\ $mock->port }
                     key=$KEY{b1};
    }

    ratepool_workspace team daily_tokens=100000000;
    ratepool_client team ${\ $t->token_hash($TOKEN)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;
ok(Ratepool::Test::redis_connected($t), 'the gateway uses Redis');

# seconds of cooldown Redis holds for an org
sub redis_cooldown {
    my ($org) = @_;
    my ($sec, $usec) = split /\n/, $redis->cli('TIME');
    my $cd = $redis->cli('HGET', "ratepool:{llm}:o:$org", 'cd') || 0;
    my $left = $cd - ($sec * 1e6 + $usec);
    return $left > 0 ? $left / 1e6 : 0;
}

sub used_b1 {
    return scalar grep { ($_->{key_name} // '') eq 'b1' } @{ $mock->log };
}

$mock->script($KEY{b1}, [ { status => 429,
                            retry_after => 'Thu, 01 Jan 2099 00:00:00 GMT' } ]);

my $tries = 0;
$tries++ while used_b1() == 0 && $tries < 20
               && $t->messages(token => $TOKEN)->{status} == 200;
is(used_b1(), 1, 'b1 got its 429, with a retry-after of 2099');
ok(redis_cooldown('org-b') > 3000,
   'Redis holds org-b\'s cooldown, an hour ('
   . int(redis_cooldown('org-b')) . ' s)');

my $sent = used_b1();
$t->messages(token => $TOKEN) for 1 .. 4;
is(used_b1(), $sent, 'and the gateway leaves org-b alone');

# org-a cools for half a minute, which a reload does not end: only
# org-b could answer now, but it cools for an hour
$mock->script($KEY{a1}, [ { status => 429, retry_after => '30' } ]);
is($t->messages(token => $TOKEN)->{status}, 429,
   'with org-a cooling too, the pool answers 429');

ok($t->reload, 'nginx reloads');
ok(Ratepool::Test::redis_connected($t), 'its new workers reach Redis');

my $deadline = time + 3;
sleep 0.1 while redis_cooldown('org-b') > 0 && time < $deadline;
is(redis_cooldown('org-b'), 0, 'the reload ended org-b\'s cooldown in Redis');

my @got = map { $t->messages(token => $TOKEN)->{status} } 1 .. 20;
is_deeply(\@got, [ (200) x 20 ],
          'with org-a still cooling, requests are answered');
is(used_b1(), $sent + 20, 'by org-b');

my $keys = Ratepool::Test::by_name($t->status->{pools}[0]{keys});
is($keys->{b1}{state}, 'ok', 'the status says b1 is ok');

like($t->error_log,
     qr/org "org-b" was to cool down for \d+ s more in redis, the reload ends it/,
     'the log says so');

# a Redis restarted without persistence is told the day's count again

sub redis_today {
    return 0 + ($redis->cli('HGET', 'ratepool:{llm}:w:team', 'dv') || 0);
}

my $today = Ratepool::Test::by_name($t->status->{workspaces})->{team}
            {tokens_today};
ok($today > 0 && redis_today() == $today,
   "Redis counts the workspace's $today tokens today");

$redis->stop;
$redis->start;
ok(Ratepool::Test::redis_connected($t), 'the gateway reconnects');

$deadline = time + 3;
sleep 0.1 while redis_today() < $today && time < $deadline;
is(redis_today(), $today, 'and tells it the day\'s count again');

$t->stop;
$t->check_log;

done_testing;
