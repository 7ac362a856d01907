#!/usr/bin/perl

# A take that Redis answers late does not resume its request twice: the
# request went on without Redis's answer (redis_timeout), the provider
# refused it with a 429, it went back to wait (ratepool_wait) and was
# admitted again; the late answer must find nobody.  Redis is paused
# while the request is out, and goes on once it is admitted again.

use strict;
use warnings;

use lib 't/lib';

use POSIX ();
use Test::More;
use Time::HiRes qw(sleep time);

use Ratepool::Test;

my $t = Ratepool::Test->new;
my $redis = $t->start_redis;

my $KEY = 'sk-ant-mock-q1-' . Ratepool::Test::random_hex(8);
my $TOKEN = 'gw-q-' . Ratepool::Test::random_hex(8);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => { $KEY => { org => 'org-q', name => 'q1' } } });

$t->write_config(<<"EOF2");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format tries '\$status \$ratepool_tries "\$upstream_status"';
    access_log %%TESTDIR%%/tries.log tries;

    ratepool_zone llm:1m redis=127.0.0.1:${\ $redis->port }
                  redis_timeout=500ms redis_lease=off;

    upstream claude {
        ratepool zone=llm;
        ratepool_key q1 org=org-q server=127.0.0.1:${\ $mock->port }
                     key=$KEY;
    }

    ratepool_workspace ci;
    ratepool_client ci ${\ $t->token_hash($TOKEN)};

    ratepool_wait 10s;

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

ok(Ratepool::Test::redis_connected($t), 'the gateway uses Redis');

sub ask {
    my (%opt) = @_;
    return $t->messages(token => $TOKEN, body => {
        max_tokens => 16,
        messages => [ { role => 'user', content => 'x' x 300 } ] }, %opt);
}

is(ask()->{status}, 200, 'a first request');

$mock->script($KEY, [ { status => 429, retry_after => '1' } ]);

pipe(my $in, my $out) or die "pipe: $!";
my $pid = fork // die "fork: $!";

if (!$pid) {
    close $in;
    sleep 0.2;
    print {$out} ask(timeout => 20)->{status};
    close $out;
    POSIX::_exit(0);
}

close $out;

# Redis hangs while the request is out (it goes on alone after 500 ms)
# and while it waits after the 429; it comes back once it is admitted

$redis->pause;

my ($seen, $start) = (0, time);
while (time < $start + 8) {
    my $waiting = $t->status->{pools}[0]{queue}{waiting} // 0;
    $seen = 1 if $waiting;
    last if $seen && !$waiting;
    sleep 0.01;
}

sleep 0.05;
$redis->resume;

my $status = do { local $/; readline $in };
waitpid $pid, 0;

ok($seen, 'the request went back to wait');
is($status, 200, 'its client gets the answer');
is_deeply([ map { $_->{status} } @{ $mock->log } ], [ 200, 429, 200 ],
    'the provider was sent it twice, once a key had room again');

sleep 0.5;
is($t->status->{totals}{in_flight}, 0, 'nothing is left in flight');

$t->check_log;

done_testing;
