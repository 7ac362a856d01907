#!/usr/bin/perl

# A fleet does not forget an org's limits because its store did: Redis
# restarted without persistence, under load from two gateways with
# ratepool_wait, comes back with empty buckets; each gateway's new
# connection tells it what the gateway knew of each org (its buckets and
# cooldowns), and answers from the provider correct it further, so the
# provider is not sent what it has no room for.  Real redis-server.

use strict;
use warnings;

use lib 't/lib';

use POSIX ();
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
    $t->write_config(<<"EOF2");
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
EOF2
    $t->run;
}

ok(Ratepool::Test::redis_connected($a, $b), 'both gateways use Redis');

# four clients, two a gateway, sending requests of about 100 tokens as
# fast as they are answered for 12 s; the org's room is used up in a few
# seconds, then one a second fits; Redis restarts, empty, at 5 s

my $start = time;
my @kids;

for my $i (0 .. 3) {
    my $pid = fork // die "fork: $!";

    if (!$pid) {
        my $gw = $i % 2 ? $b : $a;
        my $refused = 0;

        while (time < $start + 12) {
            my $r = $gw->messages(token => $TOKEN, timeout => 30, body => {
                max_tokens => 16,
                messages => [ { role => 'user', content => 'x' x 300 } ] });
            $refused++ if $r->{status} != 200;
        }

        POSIX::_exit($refused ? 1 : 0);
    }

    push @kids, $pid;
}

sleep 5;
my $restart = time;
$redis->stop;
$redis->start;

my $clients_ok = 1;
for (@kids) {
    waitpid $_, 0;
    $clients_ok = 0 if $?;
}

my @log = @{ $mock->log };
my @after = grep { $_->{t_ms} >= $restart * 1000 } @log;
my $refused = grep { $_->{status} == 429 } @after;

ok($clients_ok, 'every client was served: none was answered 429');
cmp_ok(scalar @after, '>=', 5, 'requests went on after the restart');
ok($refused < 5, 'the provider refused fewer than 5 of them')
    or diag "$refused of " . scalar(@after) . " refused";
ok(Ratepool::Test::redis_connected($a, $b),
   'both gateways use the new Redis');
like($redis->cli('HGET', 'ratepool:{llm}:o:org-w', 'Li'), qr/^6000$/,
     'which knows the org\'s limit again');

$a->check_log;
$b->check_log;

done_testing;
