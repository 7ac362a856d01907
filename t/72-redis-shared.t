#!/usr/bin/perl

# What one gateway learns about an org holds for the fleet: a 429 from
# the provider cools the org on every gateway on the same Redis, and an
# org out of money is out for all of them, without another request to
# the provider.  The Redis may be reached over a unix socket, with a
# password and a database of its own.  Real redis-server, real nginx.

use strict;
use warnings;

use lib 't/lib';

use Test::More;

use Ratepool::Test;

my $a = Ratepool::Test->new;
my $b = Ratepool::Test->new;

my $redis = $a->start_redis;
my $mock = $a->start_mock(port => 1, log => 1);

my $KEY = 'sk-ant-mock-r1-' . int(rand(1e9));
my $KEY2 = 'sk-ant-mock-r2-' . int(rand(1e9));
my $KEY4 = 'sk-ant-mock-r4-' . int(rand(1e9));

# a provider that tells its limits in its headers
my $teacher = $a->start_mock(port => 2, config => {
    keys => { $KEY4 => { org => 'taught', name => 'r4' } },
    orgs => { taught => { rpm => 100, itpm => 50000, otpm => 10000 } } });
my %TOKEN = map { $_ => "gw-$_-" . int(rand(1e9)) } qw(ci backend);

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

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location /big/ {
            rewrite ^/big(/.*)\$ \$1 break;
            ratepool_pass http://big;
        }

        location /learnt/ {
            rewrite ^/learnt(/.*)\$ \$1 break;
            ratepool_pass http://learnt;
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

# --- cooldowns are shared -----------------------------------------------------

$mock->reset;
$mock->script($KEY2, [ { status => 429, retry_after => '30' } ]);
my $r = $a->messages(token => $TOKEN{backend}, path => '/big/v1/messages');
is($r->{status}, 429, 'a 429 from the provider on the first gateway');

$r = $b->messages(token => $TOKEN{backend}, path => '/big/v1/messages');
is($r->{status}, 429, 'the second gateway knows the org cools down');
ok($r->{headers}{'retry-after'} >= 30 && $r->{headers}{'retry-after'} <= 40,
    'and says for how long (retry-after ' . ($r->{headers}{'retry-after'} // '')
    . ')');
is(scalar @{ $mock->log }, 1, 'without sending the request');

my $org = Ratepool::Test::by_name(
    Ratepool::Test::by_name($b->status->{pools})->{big}{orgs})->{wide};
ok($org->{cooldown_ms} > 20000, 'its status shows the cooldown');

# --- an org out of money is out for the fleet --------------------------------

$teacher->script($KEY4, [ { status => 429, body => { type => 'error',
    error => { type => 'rate_limit_error',
               message => 'You have reached your API usage limits.',
               details => { error_code => 'enforced_spend_limit_reached' } } }
} ], sticky => 1);
my $asked = scalar @{ $teacher->log };
$r = $a->messages(token => $TOKEN{backend}, path => '/learnt/v1/messages');
is($r->{status}, 429, 'a spend cap on one gateway');
$r = $b->messages(token => $TOKEN{backend}, path => '/learnt/v1/messages');
is($r->{status}, 429, 'keeps the other gateway from the org');
is(scalar @{ $teacher->log }, $asked + 1, 'which did not send to it');

# --- a unix socket, a password, a database ---------------------------------

my $d = Ratepool::Test->new;
my $pass = 'pw-' . int(rand(1e9));
my $unix = $d->start_redis(password => $pass, unix => 1);
$d->write_file('redis.pass', "$pass\n");
$d->write_config(config($d, server => 'unix:' . $unix->socket,
    zone => 'redis_db=3 redis_password_file=redis.pass'));
$d->run;

# every worker connected (this gateway is the only one on that Redis)
Ratepool::Test::redis_connected($d);

$r = $d->messages(token => $TOKEN{ci});
is($r->{status}, 200, 'over a unix socket, with a password and a database');
is($d->status->{store}{fallbacks}, 0, 'decided by Redis');
like($unix->cli('-n', 3, 'HGET', 'ratepool:{llm}:w:ci', 'r'), qr/^\d{10,}/,
    'which keeps it in database 3');
is($unix->cli('-n', 0, 'DBSIZE'), "0\n", 'and nothing in database 0');
unlike($d->error_log, qr/\Q$pass\E/, 'the password is in no log');

done_testing;
