#!/usr/bin/perl

# A Redis that lies cannot take a gateway down: a reply that announces an
# array of two billion elements is refused before anything is allocated
# for it (hiredis would try), the connection is dropped, and requests are
# decided as redis_fail= says, at once.  A fake Redis in the test answers
# the handshake and then every script call with that reply.

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
my $fake = Ratepool::Test::_spawn($t->testdir . '/fake_redis.log', $^X,
    't/lib/fake_redis.pl', '--port', $redis_port,
    '--reply', '*2147483647\r\n');
END { kill TERM => $fake if $fake }

for (1 .. 100) {
    last if Ratepool::Test::_accepts($redis_port);
    sleep 0.05;
}

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

my $status = $t->status;
is($status->{store}{kind}, 'redis', 'the status still answers');
is($status->{totals}{in_flight}, 0, 'and nothing is left in flight');

$t->check_log;

done_testing;
