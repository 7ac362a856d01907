#!/usr/bin/perl

# A Redis that lies cannot take a gateway down: a reply that announces an
# array of two billion elements is refused before anything is allocated
# for it (hiredis would try), the connection is dropped, and requests are
# decided as redis_fail= says, at once.  A well-formed reply that refuses
# every take with "wait 0 ms" does not have a waiting request asked for
# again forever: it is answered 429 after a bounded number of script
# calls.  Fake Redis servers in the test answer the handshake and then
# every script call with those replies.

use strict;
use warnings;

use lib 't/lib';

use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;

my $KEY = 'sk-ant-mock-h1-' . Ratepool::Test::random_hex(8);
my $TOKEN = 'gw-ci-' . Ratepool::Test::random_hex(8);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { $KEY => { org => 'org-h', name => 'h1' } },
});

my $redis_port = $t->port(2);
my $liar_port = $t->port(3);
my $count_file = $t->testdir . '/liar.count';

# the take's reply: not admitted, wait 0 ms, the org full, all else 0
my $refusal = '*18\r\n:0\r\n:0\r\n:32\r\n' . (':0\r\n' x 15);

my @fakes = (
    Ratepool::Test::_spawn($t->testdir . '/fake_redis.log', $^X,
        't/lib/fake_redis.pl', '--port', $redis_port,
        '--reply', '*2147483647\r\n'),
    Ratepool::Test::_spawn($t->testdir . '/liar_redis.log', $^X,
        't/lib/fake_redis.pl', '--port', $liar_port,
        '--reply', $refusal, '--count', $count_file),
);
END { kill TERM => @fakes if @fakes }

for my $port ($redis_port, $liar_port) {
    for (1 .. 100) {
        last if Ratepool::Test::_accepts($port);
        sleep 0.05;
    }
}

my $liar = Ratepool::Test->new;
$liar->write_config(<<"EOF2");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=127.0.0.1:$liar_port redis_timeout=50ms;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-h rpm=1000 itpm=1000000 otpm=100000;
        ratepool_key h1 org=org-h server=127.0.0.1:${\ $mock->port }
                     key=$KEY;
    }

    ratepool_workspace ci;
    ratepool_client ci ${\ $liar->token_hash($TOKEN)};

    ratepool_wait 10s;

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }
    }
}
EOF2
$liar->run;

$t->write_config(<<"EOF2");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m redis=127.0.0.1:$redis_port redis_timeout=50ms
                  redis_fail=local;

    upstream claude {
        ratepool zone=llm;
        ratepool_key h1 org=org-h server=127.0.0.1:%%PORT_1%% key=$KEY;
    }

    ratepool_workspace ci;
    ratepool_client ci ${\ $t->token_hash($TOKEN)};

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

sleep 0.5;      # the workers connect, and are answered

my @took;
for (1 .. 6) {
    my $t0 = time;
    my $r = $t->messages(token => $TOKEN, timeout => 10);
    push @took, [ $r->{status}, time - $t0 ];
}

is_deeply([ map { $_->[0] } @took ], [ (200) x 6 ],
    'every request is served, decided here as redis_fail=local says');
ok(!grep({ $_->[1] > 1 } @took), 'each within a second')
    or diag join ' ', map { sprintf '%.2f', $_->[1] } @took;
like($t->error_log, qr/it sent a reply larger than any ratepool asks for/,
     'the log says what Redis did');

# a Redis that refuses every take with "wait 0"

sleep 0.5;
my $calls_before = Ratepool::Test::_slurp($count_file) || 0;
my $t0 = time;
my $r = $liar->messages(token => $TOKEN, timeout => 15);
my $took = time - $t0;
my $calls = (Ratepool::Test::_slurp($count_file) || 0) - $calls_before;

is($r->{status}, 429, 'a Redis that refuses everything: the client gets 429');
ok($took < 5, 'within a few seconds, not its whole wait of 10 s')
    or diag "after $took s";
ok($calls <= 100, 'after a bounded number of script calls')
    or diag "$calls script calls";
like($liar->error_log, qr/redis refused a request \d+ times/,
     'the log says so');
is(scalar(grep { $_->{key_name} eq 'h1' } @{ $mock->log }), 6,
   'and it never reached the provider');

my $status = $t->status;
is($status->{store}{kind}, 'redis', 'the status still answers');
is($status->{totals}{in_flight}, 0, 'and nothing is left in flight');

$t->check_log;
$liar->check_log;

done_testing;
